"""Fixed-point quantization of a weighted update into the ring Z_{2^k}.

Secure aggregation adds integers modulo 2^k: the coordinator only ever sees
Σᵢ yᵢ mod 2^k. For that sum to decode to the true sum it must never wrap, so
the ring is sized from public bounds:

* ``clip`` C — each coordinate of an update is clipped to [−C, C];
* ``max_weight`` W — an organization's weight nᵢ (its example count) is at
  most W; it enters as the factor nᵢ/W ∈ (0, 1];
* ``max_clients`` N — at most N inputs are summed;
* ``frac_bits`` f — the quantization step is 2^−f.

Organization i sends qᵢ = rint(nᵢ/W · clip(xᵢ) · 2^f), so |qᵢ| ≤ Q = rint(C·2^f),
and the sum of N of them fits a signed k-bit integer when N·Q ≤ 2^(k−1) − 1.
One more ring element carries nᵢ itself (exact), so the coordinator learns
Σ nᵢ, never an individual nᵢ; that needs N·W ≤ 2^(k−1) − 1 too.

The weighted mean is Σ qᵢ·2^−f · W / Σ nᵢ; each qᵢ is off by at most ½, so the
mean is within ``mean_error_bound`` = N·2^−f·W / (2·Σ nᵢ) of the exact weighted
mean of the clipped updates.

DP-FedAvg (uniform weights: W = 1, every nᵢ = 1) bounds each input's L2 norm
by C instead; every coordinate is then within ±C, so C is also the clip, and
an input clipped to C − ``rounding_norm`` stays within C once rounded.

``RingSpec.derive`` either fills a given ring (k = 32 by default, so the
masked payload is exactly as large as fp32) with the finest step that cannot
wrap, or, given f, takes the smallest k that cannot. Rings up to 32 bits are
stored as uint32, larger ones (up to 64) as uint64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from protos.secagg.errors import SecAggError

#: the largest |qᵢ| float64 represents exactly (rint beyond it is not exact)
_MAX_EXACT = 2**53


@dataclass(frozen=True)
class RingSpec:
    ring_bits: int
    frac_bits: int
    clip: float
    max_weight: int
    max_clients: int

    # ---- construction ------------------------------------------------------
    @classmethod
    def derive(
        cls,
        max_clients: int,
        clip: float,
        max_weight: int,
        *,
        frac_bits: int | None = None,
        ring_bits: int = 32,
    ) -> "RingSpec":
        """The ring for N = ``max_clients`` inputs. With ``frac_bits``: the smallest
        ring that holds their sum; without: the finest step that fits ``ring_bits``."""
        if not (isinstance(max_clients, int) and max_clients >= 1):
            raise SecAggError(f"max_clients must be a positive integer, got {max_clients!r}")
        if not (math.isfinite(clip) and clip > 0):
            raise SecAggError(f"clip must be a positive number, got {clip!r}")
        if not (isinstance(max_weight, int) and max_weight >= 1):
            raise SecAggError(f"max_weight must be a positive integer, got {max_weight!r}")
        if frac_bits is None:
            limit = 2 ** (ring_bits - 1) - 1
            frac_bits = math.floor(math.log2(limit / (max_clients * clip)))
            while max_clients * _q_max(clip, frac_bits) > limit:
                frac_bits -= 1
        else:
            needed = max_clients * _q_max(clip, frac_bits)
            ring_bits = needed.bit_length() + 1  # + the sign bit
        weight_bits = (max_clients * max_weight).bit_length() + 1
        spec = cls(max(ring_bits, weight_bits), frac_bits, float(clip), max_weight, max_clients)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise SecAggError unless a sum of ``max_clients`` inputs cannot wrap."""
        if not 2 <= self.ring_bits <= 64:
            raise SecAggError(f"ring of {self.ring_bits} bits: supported are 2..64 (uint32 or uint64 storage)")
        limit = 2 ** (self.ring_bits - 1) - 1
        q = _q_max(self.clip, self.frac_bits)
        if q > _MAX_EXACT:
            raise SecAggError(f"step 2^-{self.frac_bits} for clip {self.clip} exceeds float64's exact integers")
        if q < 1:
            raise SecAggError(f"step 2^-{self.frac_bits} is coarser than clip {self.clip}: every value rounds to 0")
        if self.max_clients * q > limit:
            raise SecAggError(
                f"{self.max_clients} inputs of up to ±{q} (clip {self.clip}, step 2^-{self.frac_bits}) "
                f"can wrap a {self.ring_bits}-bit ring; lower clip, frac_bits or the number of organizations"
            )
        if self.max_clients * self.max_weight > limit:
            raise SecAggError(
                f"the weight sum of {self.max_clients} organizations (max_weight {self.max_weight}) "
                f"can wrap a {self.ring_bits}-bit ring"
            )

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RingSpec":
        try:
            spec = cls(int(values["ring_bits"]), int(values["frac_bits"]), float(values["clip"]),
                       int(values["max_weight"]), int(values["max_clients"]))
        except (KeyError, TypeError, ValueError) as err:
            raise SecAggError(f"ring parameters do not parse: {err}") from None
        spec.validate()
        return spec

    # ---- storage -----------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u4") if self.ring_bits <= 32 else np.dtype("<u8")

    @property
    def modulus_mask(self) -> int:
        """x & mask == x mod 2^k (a no-op when k equals the storage width)."""
        return (1 << self.ring_bits) - 1

    @property
    def step(self) -> float:
        return math.ldexp(1.0, -self.frac_bits)

    def reduce(self, values: np.ndarray) -> None:
        """values mod 2^k, in place."""
        if self.ring_bits < self.dtype.itemsize * 8:
            np.bitwise_and(values, self.dtype.type(self.modulus_mask), out=values)

    # ---- client side -------------------------------------------------------
    def check_weight(self, weight: int) -> None:
        if not (isinstance(weight, (int, np.integer)) and 1 <= weight <= self.max_weight):
            raise SecAggError(f"weight {weight!r} outside 1..max_weight={self.max_weight}")

    def quantize(self, values: np.ndarray, weight: int, out: np.ndarray | None = None) -> np.ndarray:
        """rint(weight/W · clip(values) · 2^f) as ring elements (two's complement mod 2^k).

        Non-finite values are refused: they have no place in a ring.
        """
        self.check_weight(weight)
        x = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise SecAggError("the update holds NaN or Inf")
        scaled = np.clip(x, -self.clip, self.clip)
        scaled *= math.ldexp(float(weight) / self.max_weight, self.frac_bits)
        ring = np.rint(scaled, out=scaled).astype(np.int64).astype(self.dtype)
        if out is not None:
            out[...] = ring
            ring = out
        self.reduce(ring)
        return ring

    def encode_weight(self, weight: int) -> int:
        self.check_weight(weight)
        return int(weight)

    # ---- coordinator side --------------------------------------------------
    def to_signed(self, values: np.ndarray) -> np.ndarray:
        """Ring elements as signed integers in [−2^(k−1), 2^(k−1)), int64."""
        signed = np.asarray(values).astype(np.int64)
        if self.ring_bits < 64:
            half, full = 1 << (self.ring_bits - 1), 1 << self.ring_bits
            signed = np.where(signed >= half, signed - full, signed)
        return signed

    def decode_weight(self, value: int) -> int:
        return int(self.to_signed(np.array([value], dtype=self.dtype))[0])

    def dequantize_mean(self, total: np.ndarray, weight_sum: int) -> np.ndarray:
        """The weighted mean, float64, from the unmasked sum of quantized inputs."""
        if weight_sum <= 0:
            raise SecAggError(f"the unmasked weight sum is {weight_sum}: the masks did not cancel")
        scale = math.ldexp(float(self.max_weight) / weight_sum, -self.frac_bits)
        return self.to_signed(total) * scale

    def rounding_norm(self, length: int) -> float:
        """The largest L2 norm of the rounding error of ``length`` values quantized
        with weight ``max_weight`` (each off by at most half a step): √length·2^−f/2.
        An input of L2 norm at most B − this is quantized to one of norm at most B
        (DP-FedAvg's bound must hold for what is summed, not only for what was clipped)."""
        return math.sqrt(length) * self.step / 2.0

    def mean_error_bound(self, num_inputs: int, weight_sum: int) -> float:
        """The largest |secure mean − exact weighted mean of the clipped inputs|."""
        return num_inputs * self.step * self.max_weight / (2.0 * weight_sum)


def _q_max(clip: float, frac_bits: int) -> int:
    return int(np.rint(math.ldexp(clip, frac_bits)))
