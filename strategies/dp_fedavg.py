"""DP-FedAvg with client-level differential privacy (McMahan, Ramage, Talwar &
Zhang 2018, "Learning Differentially Private Recurrent Language Models",
Algorithm 1 with uniform weights and the fixed denominator).

Each organization's delta (its update − the round's global, over the shared
factors, one L2 norm over the whole adapter) is clipped to ``clip_norm`` C;
the clipped deltas are summed, divided by m, the *expected* number of
participants (the coordinator samples exactly m = q·online organizations, so
m is known before any reply arrives), and Gaussian noise is added:

    global ← global + (Σ_i clip(Δ_i, C) + N(0, (zC)² I)) / m

Add or remove one organization and the sum moves by at most C, whatever its
data: the sensitivity the accountant (strategies/accountant.py) is told about.
Two things keep it so. The weights are uniform (each organization counts once;
its reported number of examples is ignored: example weights would let one
organization claim a large weight). The denominator is fixed: an organization
that drops out makes the step smaller, it does not change the divisor.

Where the noise is added (``noise_placement``):

* ``"server"`` (central DP): the coordinator clips each update and adds
  N(0, (zC)²) once to the sum. It sees individual clipped updates: it is
  trusted. Against everyone who sees the global adapters (the organizations,
  the exported specialist), the round is the sampled Gaussian mechanism with
  q = sampled/online.
* ``"local"``: each organization clips its own delta and adds N(0, (zC)²) to
  it before sending (clients/privacy.py, told through the round config's
  ``dp_clip``/``dp_noise``); the coordinator only averages. The guarantee holds
  against the coordinator too, but there is no amplification by sampling (the
  coordinator knows who took part: q = 1 per round) and the sum carries k times
  the noise, so the model is much noisier for the same ε.
* with secure aggregation (placement "server"; ``secure_input``): each
  organization clips its own delta (round config ``dp_clip`` with ``dp_noise``
  0: the coordinator cannot see an individual update to clip it) and masks it
  with weight 1; the coordinator unmasks only the *unweighted* sum of the
  clipped deltas (``accumulate_secure_sum``) and ``finish_round`` adds the
  noise once to it, from the same generator, exactly as in "server". Same
  accounting as "server" (q = sampled/online): the released global is the same
  mechanism. The coordinator still sees that sum before the noise: it is
  trusted with the sum, no longer with any single update. "local" placement
  and secure aggregation are not combined: the noise goes on the sum.

Where the noise comes from. Round k's noise is a pure function of a 256-bit
secret key and k: HMAC-SHA256(key, "silotune/dp-fedavg/noise/v1" || k) keys
a counter-based Philox generator whose Gaussian draws (NumPy's ziggurat, the
same bits on every machine) fill the adapter's tensors in sorted-name order.
Nothing stateful needs saving, so ``state_dict`` is empty: a resumed
coordinator that holds the same key draws the same noise bits as one that was
never stopped, and a checkpoint (or a backup of one) holds nothing from which
the noise could be rebuilt. (Before issue 11 the generator's state went into
every checkpoint: two consecutive checkpoints gave back the un-noised mean.)

The key itself is not this module's business: strategies/ reads no files. By
default each instance makes a random key in memory (``new_noise_key``); the
coordinator (server/privacy.py) replaces it with ``set_noise_key`` by the
job's key, kept apart from the checkpoints in ``<run-dir>/secrets/`` (0600),
and records only ``noise_key_fingerprint`` (a hash, useless for recovery) in
each checkpoint, so that a resume with a missing or different key is refused.
``noise_seed`` >= 0 derives the key from the seed instead: runs become
reproducible for tests and experiments, and the guarantee is void against
whoever knows that seed — it is NOT private.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from protos.adapter import Adapter
from strategies.base import AggregationError, SecureInput, Strategy
from strategies.checks import check_choice, check_float, check_int, check_same_layout
from strategies.registry import register_strategy

PLACEMENTS = ("server", "local")
NOISE_KEY_BYTES = 32   # 256-bit secret
_NOISE_DOMAIN = b"silotune/dp-fedavg/noise/v1\x00"
_SEED_DOMAIN = b"silotune/dp-fedavg/noise_seed/v1\x00"
_FINGERPRINT_DOMAIN = b"silotune/dp-fedavg/noise-key-fingerprint/v1\x00"
_LEGACY_STATE = "noise_rng_state"   # what checkpoints held before issue 11


def new_noise_key() -> bytes:
    """A fresh random 256-bit noise key from the operating system's CSPRNG."""
    return secrets.token_bytes(NOISE_KEY_BYTES)


def noise_key_from_seed(seed: int) -> bytes:
    """The key an explicit ``noise_seed`` stands for (reproducible, so NOT private)."""
    return hashlib.sha256(_SEED_DOMAIN + str(int(seed)).encode()).digest()


def noise_key_fingerprint(key: bytes) -> str:
    """Names a key without revealing it (a domain-separated SHA-256; the key has 256 bits)."""
    return "sha256:" + hashlib.sha256(_FINGERPRINT_DOMAIN + bytes(key)).hexdigest()[:32]


def round_noise_generator(key: bytes, server_round: int) -> np.random.Generator:
    """The generator of round ``server_round``'s noise: Philox keyed by HMAC-SHA256(key, round).

    A pure function of (key, round): the same bits after any restart, and one
    round's stream says nothing about another round's without the key."""
    if len(key) != NOISE_KEY_BYTES:
        raise ValueError(f"dp-fedavg: a noise key has {NOISE_KEY_BYTES} bytes, got {len(key)}")
    if isinstance(server_round, bool) or not isinstance(server_round, (int, np.integer)) or server_round < 0:
        raise ValueError(f"dp-fedavg: round must be an int >= 0, got {server_round!r}")
    block = hmac.new(bytes(key), _NOISE_DOMAIN + int(server_round).to_bytes(8, "big"), hashlib.sha256).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(block[:16], "little"),
                                                counter=int.from_bytes(block[16:], "little")))


@dataclass(frozen=True)
class PrivacyStep:
    """What one round costs, for the accountant: sampled Gaussian with (q, z)."""

    q: float
    noise_multiplier: float


@runtime_checkable
class PrivateStrategy(Protocol):
    """A strategy whose rounds the coordinator's accountant must charge.

    The coordinator calls ``plan_round(sampled, online)`` after sampling and
    before ``begin_round``; the returned step is charged when the round's
    global is released."""

    noise_multiplier: float
    noise_placement: str

    def plan_round(self, sampled: int, online: int) -> PrivacyStep: ...


@register_strategy("dp-fedavg")
class DpFedAvg(Strategy):
    """DP-FedAvg: clip each organization's delta to C, sum, divide by the expected
    number of organizations, add Gaussian noise of standard deviation z·C once.

    Parameters:
        clip_norm: C > 0, the bound on each organization's delta L2 norm
            over the shared factors (default 1.0).
        noise_multiplier: z >= 0; the noise on the sum has standard deviation
            z·C per coordinate (default 1.0; 0 means no privacy, ε = ∞).
        noise_placement: "server" (the coordinator clips and adds the noise
            once; central DP) or "local" (each organization clips and adds
            its own noise before sending) (default "server").
        noise_seed: -1 (default): the noise comes from a secret 256-bit key
            (random per instance; the coordinator hands in the job's key,
            kept in ``<run-dir>/secrets/``); a seed >= 0 derives the key from
            the seed, making the noise reproducible (tests and experiments
            only: NOT private, whoever knows the seed can remove the noise).
    """

    family = "private"

    def __init__(self, clip_norm: float = 1.0, noise_multiplier: float = 1.0,
                 noise_placement: str = "server", noise_seed: int = -1) -> None:
        self.clip_norm = check_float(self.name, "clip_norm", clip_norm, low=0.0, low_open=True)
        self.noise_multiplier = check_float(self.name, "noise_multiplier", noise_multiplier, low=0.0)
        self.noise_placement = check_choice(self.name, "noise_placement", noise_placement, PLACEMENTS)
        self.noise_seed = check_int(self.name, "noise_seed", noise_seed, low=-1)
        self._noise_key = new_noise_key() if self.noise_seed < 0 else noise_key_from_seed(self.noise_seed)
        self._expected: int | None = None   # m, set by plan_round
        self._round: int | None = None      # set by begin_round: the noise is drawn for it
        self._global: Adapter | None = None
        self._sum: dict[str, np.ndarray] | None = None
        self._count = 0
        self.clipped = 0  # updates scaled down this round, for logs

    # ---- the coordinator's side ----------------------------------------------
    def plan_round(self, sampled: int, online: int) -> PrivacyStep:
        """Fix this round's denominator m = ``sampled`` and say what it costs."""
        if not 1 <= sampled <= online:
            raise ValueError(f"dp-fedavg: need 1 <= sampled <= online, got {sampled} of {online}")
        self._expected = int(sampled)
        q = 1.0 if self.noise_placement == "local" else sampled / online
        return PrivacyStep(q=q, noise_multiplier=self.noise_multiplier)

    def configure_train(self, server_round: int) -> dict[str, float]:
        if self.noise_placement == "local":
            return {"dp-clip": self.clip_norm, "dp-noise": self.noise_multiplier}
        return {}

    # ---- the noise key ---------------------------------------------------------
    @property
    def noise_key_source(self) -> str:
        """Either "secret" (a random key, private) or "noise_seed" (derived from the seed, NOT private)."""
        return "secret" if self.noise_seed < 0 else "noise_seed"

    @property
    def noise_key_fingerprint(self) -> str:
        return noise_key_fingerprint(self._noise_key)

    def set_noise_key(self, key: bytes) -> None:
        """Use the job's secret key (server/privacy.py keeps it out of the checkpoints)."""
        if self.noise_seed >= 0:
            raise ValueError(f"dp-fedavg: noise_seed={self.noise_seed} sets the noise; a secret key does not apply")
        if not isinstance(key, (bytes, bytearray)) or len(key) != NOISE_KEY_BYTES:
            raise ValueError(f"dp-fedavg: a noise key is {NOISE_KEY_BYTES} bytes")
        self._noise_key = bytes(key)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the new global's step."""
        if self._expected is None:
            raise AggregationError("dp-fedavg: plan_round() was not called")
        return self.noise_multiplier * self.clip_norm / self._expected

    # ---- streaming aggregation ----------------------------------------------
    def begin_round(self, server_round: int, global_adapter: Adapter) -> None:
        if self._expected is None:
            raise AggregationError("dp-fedavg needs the round's sampling: call plan_round() before begin_round()")
        self._round = int(server_round)
        self._global = global_adapter
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_adapter.items()}
        self._count = 0
        self.clipped = 0

    def _admit(self, count: int) -> None:
        if self._global is None or self._sum is None or self._expected is None:
            raise AggregationError("accumulate() before begin_round()")
        if self._count + count > self._expected:
            # more contributions than organizations sampled would break the sensitivity bound
            raise AggregationError(f"dp-fedavg: more than the {self._expected} sampled organization(s) this round")

    def accumulate(self, update: Adapter, num_examples: int) -> None:
        """Fold in one organization's update; ``num_examples`` is ignored (uniform weights)."""
        self._admit(1)
        assert self._global is not None and self._sum is not None
        check_same_layout(update, self._global)
        scale = 1.0
        if self.noise_placement == "server":
            sq_norm = 0.0
            for key, base in self._global.items():
                delta = update[key].astype(np.float64) - base
                sq_norm += float(np.vdot(delta, delta))
            norm = float(np.sqrt(sq_norm))
            if norm > self.clip_norm:
                scale = self.clip_norm / norm
                self.clipped += 1
        # "local": the organization clipped and noised it; clipping a noisy update here would shrink its noise
        for key, total in self._sum.items():
            delta = update[key].astype(np.float64) - self._global[key]
            if scale != 1.0:
                delta *= scale
            total += delta
        self._count += 1

    # ---- secure aggregation ----------------------------------------------------
    def secure_input(self) -> SecureInput:
        """Organizations mask their delta clipped to C, each with weight 1: the sum then
        moves by at most C when one organization is added or removed, as in the plain path."""
        self._secure_placement()
        return SecureInput(clip_norm=self.clip_norm)

    def _secure_placement(self) -> None:
        if self.noise_placement != "server":
            raise AggregationError(
                "dp-fedavg: a secure sum takes its noise at the coordinator (noise_placement='server'); "
                "noise_placement=local with secure-aggregation would noise every update instead")

    def accumulate_secure(self, mean: Adapter, weight_sum: int, count: int) -> None:
        # an example-weighted mean has no per-organization bound: the sensitivity would be lost
        raise AggregationError("dp-fedavg takes the unweighted sum of clipped deltas under secure aggregation "
                               "(accumulate_secure_sum), not an example-weighted mean")

    def accumulate_secure_sum(self, clipped_sum: Adapter, count: int) -> None:
        """The unmasked, unweighted sum of ``count`` organizations' deltas (update −
        global), each clipped to ``clip_norm`` by its organization. The coordinator
        never saw the parts; the noise is added once to the whole in ``finish_round``,
        divided by the expected count m as in the plain path."""
        self._secure_placement()
        if count < 1:
            raise ValueError("count must be >= 1")
        self._admit(count)
        assert self._global is not None and self._sum is not None
        check_same_layout(clipped_sum, self._global)
        for key, total in self._sum.items():
            total += clipped_sum[key].astype(np.float64)
        self._count += count

    # ---- the new global: the same for both paths ------------------------------
    def finish_round(self) -> Adapter:
        if (self._global is None or self._sum is None or self._count == 0 or self._expected is None
                or self._round is None):
            raise AggregationError("no update was accumulated this round")
        m = float(self._expected)
        std = self.noise_std if self.noise_placement == "server" else 0.0
        rng = round_noise_generator(self._noise_key, self._round) if std > 0.0 else None
        result: Adapter = {}
        for key in sorted(self._sum):  # a fixed order: the noise stream is the same on every run
            step = self._sum[key] / m
            if rng is not None:
                step += rng.standard_normal(step.shape) * std
            result[key] = (self._global[key].astype(np.float64) + step).astype(np.float32)
        result = {key: result[key] for key in self._global}
        self._global, self._sum, self._count, self._expected, self._round = None, None, 0, None, None
        return result

    # ---- state -------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Nothing: round k's noise is a function of (key, k), and the key never goes into a checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if not state:
            return
        if _LEGACY_STATE in state:
            raise ValueError(
                "strategy 'dp-fedavg': this checkpoint holds the noise generator's state (written before "
                "issue 11): anyone who reads it can remove the noise, and this version derives each round's "
                "noise from a secret key instead, so it cannot continue that job byte for byte; start the job "
                "in a new run-dir (and treat the old checkpoints as un-noised)")
        raise ValueError(f"strategy 'dp-fedavg': unexpected state keys {sorted(state)[:3]}")
