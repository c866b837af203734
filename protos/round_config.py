"""The round config: what the coordinator tells an organization to do.

It rides in the instruction message as a Flower ConfigRecord
(``records.CONFIG_RECORD``) beside the encoded global adapter. Both sides
parse it through the same class, so a key renamed on one side cannot silently
be ignored on the other.

Its fields are not written here: they are the ``ROUND``-scoped fields of
``JobSettings`` (protos/job_settings.py), plus the round number and what the
strategy asks of the organizations (``StrategyInstructions``). Simulation
settings travel in their own record (``SimulationSettings``), which the
coordinator attaches only on Flower's Simulation Engine.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from typing import Any

from flwr.app import ConfigRecord

from protos.adapter import LoraSpec
from protos.job_settings import ROUND, SIMULATION, JobSettings, settings_of
from protos.records import CONFIG_RECORD, SIMULATION_RECORD

__all__ = ["CONFIG_RECORD", "SIMULATION_RECORD", "RoundConfig", "SimulationSettings", "StrategyInstructions"]


@dataclass(frozen=True)
class StrategyInstructions:
    """Set by the strategy (strategies/base.py): what the organizations train and send."""

    proximal_mu: float = 0.0                 # FedProx: μ/2·‖w − w_global‖² on the trained factors
    train_factors: str = "lora_A,lora_B"     # FFA-LoRA trains B only
    share_factors: str = "lora_A,lora_B"     # sent up and aggregated; the others stay local (FedSA-LoRA)
    rank_reduction: str = "none"             # none | truncate | svd: global rank R → an organization's rank
    dp_clip: float = 0.0                     # DP at the organization (clients/privacy.py): clip the delta to this L2 norm (0: off)
    dp_noise: float = 0.0                    # ...then add N(0, (dp_noise·dp_clip)²) to each coordinate (0: clip only)


class _RecordMethods:
    """Flower ConfigRecord ⇄ dataclass, for the classes derived below."""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Any:
        declared = fields(cls)  # type: ignore[arg-type]
        values = {f.name: record[f.name] for f in declared if f.name in record}
        absent = [f.name for f in declared if f.default is MISSING and f.name not in values]
        if absent:
            raise ValueError(f"{cls.__name__} lacks {absent}")
        return cls(**values)


class _RoundMethods(_RecordMethods):
    lora_r: int
    lora_alpha: float
    lora_targets: str
    lora_dropout: float

    @property
    def lora(self) -> LoraSpec:
        targets = tuple(sorted(t.strip() for t in self.lora_targets.split(",") if t.strip()))
        return LoraSpec(rank=self.lora_r, alpha=self.lora_alpha, target_modules=targets, dropout=self.lora_dropout)


def _projection(name: str, scope: str, extra: list[tuple[str, type, Any]], bases: tuple[type, ...]) -> type:
    """A frozen dataclass with ``extra`` first, then the settings of ``scope``.

    Settings become required fields: the coordinator always sends every one,
    so a default here could only hide a key that went missing."""
    spec: list[Any] = [(n, t, field()) if d is MISSING else (n, t, field(default=d)) for n, t, d in extra]
    required = [(f.name, f.type) for f in settings_of(scope)]
    cls = make_dataclass(name, required + spec, bases=bases, frozen=True)
    cls.__module__ = __name__  # so that pickle (Ray) finds it here
    return cls


RoundConfig = _projection(
    "RoundConfig", ROUND,
    [("server_round", int, MISSING)] + [(f.name, f.type, f.default) for f in fields(StrategyInstructions)],
    (_RoundMethods,),
)
RoundConfig.__doc__ = "One round's instruction to an organization (see the module docstring)."

SimulationSettings = _projection("SimulationSettings", SIMULATION, [], (_RecordMethods,))
SimulationSettings.__doc__ = "What a virtual organization of a simulation needs to build its silo."


def round_config(settings: JobSettings, server_round: int, **instructions: Any) -> Any:
    """The round config for ``server_round``: the job's round-scoped settings
    plus the strategy's ``instructions`` (StrategyInstructions fields)."""
    return RoundConfig(server_round=server_round, **settings.scoped(ROUND), **instructions)


def simulation_settings(settings: JobSettings) -> Any:
    return SimulationSettings(**settings.scoped(SIMULATION))
