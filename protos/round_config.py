"""The round config: what the coordinator tells an organization to do.

It rides in the instruction message as a Flower ConfigRecord (``CONFIG_RECORD``)
beside the encoded global adapter. Both sides parse it through this one
dataclass, so a key renamed on one side cannot silently be ignored on the other.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord

from protos.adapter import LoraSpec

CONFIG_RECORD = "silotune.config"


@dataclass(frozen=True)
class RoundConfig:
    job_id: str
    server_round: int
    model: str
    lora_rank: int
    lora_alpha: float
    lora_targets: str          # comma-separated module names
    lora_dropout: float = 0.0
    local_steps: int = 10
    batch_size: int = 4
    learning_rate: float = 5e-4
    max_length: int = 160
    seed: int = 0
    test_fraction: float = 0.2
    eval_max_examples: int = 64
    update_encoding: str = "fp32"
    # Set by the strategy (strategies/base.py): what the organizations train and send.
    proximal_mu: float = 0.0                 # FedProx: μ/2·‖w − w_global‖² on the trained factors
    train_factors: str = "lora_A,lora_B"     # FFA-LoRA trains B only
    share_factors: str = "lora_A,lora_B"     # sent up and aggregated; the others stay local (FedSA-LoRA)
    rank_reduction: str = "none"             # none | truncate | svd: global rank R → an organization's rank
    dp_clip: float = 0.0                     # DP at the organization (clients/privacy.py): clip the delta to this L2 norm (0: off)
    dp_noise: float = 0.0                    # ...then add N(0, (dp_noise·dp_clip)²) to each coordinate (0: clip only)
    # Virtual organizations (simulation only; deployment agents bring a silo file).
    sim_dataset: str = "bbc-news"
    sim_skew: float = 0.8
    sim_max_records: int = 120
    sim_ranks: str = ""                      # e.g. "4,8,16": virtual organization i gets rank ranks[i % 3]
    sim_attack: str = ""                     # experiments only: "sign-flip:0.2" (clients/attacks.py)

    @property
    def lora(self) -> LoraSpec:
        targets = tuple(sorted(t.strip() for t in self.lora_targets.split(",") if t.strip()))
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, target_modules=targets, dropout=self.lora_dropout)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({k: v for k, v in asdict(self).items()})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "RoundConfig":
        values = {f.name: record[f.name] for f in fields(cls) if f.name in record}
        absent = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
        if absent:
            raise ValueError(f"round config lacks {absent}")
        return cls(**values)
