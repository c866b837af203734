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

The noise comes from a NumPy PCG64 generator whose state is part of
``state_dict``: a coordinator resumed from a checkpoint draws the same noise
bits as one that was never stopped. By default it is seeded from the operating
system's entropy, never from the job seed (which is in the provenance: anyone
who knows the noise can subtract it). ``noise_seed`` >= 0 makes runs
reproducible for tests and experiments, and voids the guarantee against
whoever knows that seed.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from protos.adapter import Adapter
from strategies.base import AggregationError, SecureInput, Strategy
from strategies.checks import check_choice, check_float, check_int, check_same_layout
from strategies.registry import register_strategy

PLACEMENTS = ("server", "local")
_RNG_KEY = "noise_rng_state"


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
        noise_seed: -1 (default) seeds the noise from the operating system's
            entropy; a seed >= 0 makes the noise reproducible (tests and
            experiments only: whoever knows the seed can remove the noise).
    """

    family = "private"

    def __init__(self, clip_norm: float = 1.0, noise_multiplier: float = 1.0,
                 noise_placement: str = "server", noise_seed: int = -1) -> None:
        self.clip_norm = check_float(self.name, "clip_norm", clip_norm, low=0.0, low_open=True)
        self.noise_multiplier = check_float(self.name, "noise_multiplier", noise_multiplier, low=0.0)
        self.noise_placement = check_choice(self.name, "noise_placement", noise_placement, PLACEMENTS)
        self.noise_seed = check_int(self.name, "noise_seed", noise_seed, low=-1)
        self._rng = np.random.Generator(np.random.PCG64(
            secrets.randbits(128) if self.noise_seed < 0 else self.noise_seed))
        self._expected: int | None = None   # m, set by plan_round
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
        if self._global is None or self._sum is None or self._count == 0 or self._expected is None:
            raise AggregationError("no update was accumulated this round")
        m = float(self._expected)
        std = self.noise_std if self.noise_placement == "server" else 0.0
        result: Adapter = {}
        for key in sorted(self._sum):  # a fixed order: the noise stream is the same on every run
            step = self._sum[key] / m
            if std > 0.0:
                step += self._rng.standard_normal(step.shape) * std
            result[key] = (self._global[key].astype(np.float64) + step).astype(np.float32)
        result = {key: result[key] for key in self._global}
        self._global, self._sum, self._count, self._expected = None, None, 0, None
        return result

    # ---- state -------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """The noise generator's state (JSON bytes as uint8): a resumed run draws the same noise."""
        blob = json.dumps(self._rng.bit_generator.state, sort_keys=True).encode()
        return {_RNG_KEY: np.frombuffer(blob, dtype=np.uint8).copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if not state:
            return
        bad = sorted(set(state) - {_RNG_KEY})
        if bad:
            raise ValueError(f"strategy 'dp-fedavg': unexpected state keys {bad[:3]}")
        saved = json.loads(np.asarray(state[_RNG_KEY], dtype=np.uint8).tobytes().decode())
        if saved.get("bit_generator") != "PCG64":
            raise ValueError(f"strategy 'dp-fedavg': noise generator {saved.get('bit_generator')!r}, expected PCG64")
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = saved
        self._rng = rng
