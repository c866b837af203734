"""The LoRA adapter as both sides see it: its configuration and tensor layout.

An adapter travels and is stored as ``dict[str, np.ndarray]`` of float32
arrays whose keys are exactly PEFT's saved-state keys (what
``get_peft_model_state_dict`` returns, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). Using
PEFT's own names means a checkpoint *is* a PEFT adapter folder and the trainer
loads a global adapter with ``set_peft_model_state_dict`` without renaming.

The coordinator needs the layout (names and shapes) without the weights, so it
is derived from the model config on the ``meta`` device: no memory, no load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Adapter = dict[str, np.ndarray]

LORA_A = "lora_A"
LORA_B = "lora_B"


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters shared by every organization in a job.

    Attributes:
        rank: the LoRA rank r (columns of B, rows of A).
        alpha: scaling numerator; the update applied is (alpha / rank) * B @ A.
        target_modules: names of the Linear modules that get an adapter
            (matched on the last component of the module path, as PEFT does).
        dropout: LoRA dropout used during local training.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # alpha=8 and alpha=8.0 must be the same spec, and write the same adapter_config.json
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules must name at least one module")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def peft_config_dict(self, base_model_name_or_path: str) -> dict[str, Any]:
        """The adapter_config.json that PEFT writes for this spec."""
        from peft import LoraConfig

        cfg = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name_or_path,
        )
        out = cfg.to_dict()
        # to_dict() leaves sets and enums that json cannot write.
        out["target_modules"] = sorted(self.target_modules)
        out["peft_type"] = "LORA"
        out["task_type"] = "CAUSAL_LM"
        return out

    @classmethod
    def from_peft_config_dict(cls, cfg: dict[str, Any]) -> "LoraSpec":
        targets = cfg["target_modules"]
        if isinstance(targets, str):
            targets = [targets]
        return cls(
            rank=int(cfg["r"]),
            alpha=float(cfg["lora_alpha"]),
            target_modules=tuple(sorted(targets)),
            dropout=float(cfg.get("lora_dropout", 0.0)),
        )


def adapter_layout(model_config: Any, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the adapter tensors for a transformers config.

    Built on the meta device, so it costs neither memory nor a weight load.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    layout: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in spec.target_modules:
            continue
        if not hasattr(module, "in_features"):
            continue
        prefix = f"base_model.model.{name}"
        layout[f"{prefix}.{LORA_A}.weight"] = (spec.rank, module.in_features)
        layout[f"{prefix}.{LORA_B}.weight"] = (module.out_features, spec.rank)
    if not layout:
        raise ValueError(
            f"no module of the base model matches target_modules={spec.target_modules}"
        )
    return dict(sorted(layout.items()))


def init_adapter(layout: dict[str, tuple[int, ...]], seed: int) -> Adapter:
    """PEFT's default LoRA initialisation, reproducible from a seed.

    A ~ kaiming_uniform(a=sqrt(5)) (as nn.Linear and PEFT do), B = 0, so the
    initial adapter is a no-op on the base model. The same seed gives the same
    adapter on every machine, which makes a whole job reproducible.
    """
    rng = np.random.default_rng(seed)
    adapter: Adapter = {}
    for name, shape in sorted(layout.items()):
        if f".{LORA_B}." in name:
            adapter[name] = np.zeros(shape, dtype=np.float32)
        else:
            fan_in = shape[1]
            # kaiming_uniform with a=sqrt(5): bound = sqrt(6 / ((1 + a^2) * fan_in))
            bound = math.sqrt(6.0 / (6.0 * fan_in))
            adapter[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return adapter


def adapter_num_parameters(adapter: Adapter) -> int:
    return int(sum(a.size for a in adapter.values()))


class AdapterFolderError(ValueError):
    """A PEFT adapter folder that cannot be used (missing file, not LoRA, bad tensors)."""


def read_adapter_folder(folder: str | Path) -> tuple[LoraSpec, str, Adapter]:
    """(LoRA spec, base model name, tensors) of a PEFT adapter folder.

    Reads any LoRA folder PEFT writes (ours or ``save_pretrained``'s), so the
    eval and generate commands also work on adapters trained elsewhere.
    """
    import json

    from safetensors.numpy import load_file

    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    weights_path = folder / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterFolderError(f"{folder} is not a PEFT adapter folder: {path.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFolderError(f"{config_path} is not valid JSON: {err}") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterFolderError(f"{folder}: peft_type {config.get('peft_type')!r}, only LORA is supported")
    tensors = {name: value.astype(np.float32) for name, value in load_file(str(weights_path)).items()}
    return LoraSpec.from_peft_config_dict(config), str(config.get("base_model_name_or_path") or ""), tensors


FACTORS = (LORA_A, LORA_B)


def factor_of(name: str) -> str:
    """'lora_A' or 'lora_B' for a PEFT adapter key."""
    for factor in FACTORS:
        if f".{factor}." in name:
            return factor
    raise ValueError(f"{name!r} is not a LoRA factor")


def parse_factors(text: str) -> tuple[str, ...]:
    """'lora_A,lora_B' → ('lora_A', 'lora_B'), validated."""
    factors = tuple(sorted({f.strip() for f in text.split(",") if f.strip()}))
    if not factors or any(f not in FACTORS for f in factors):
        raise ValueError(f"factors {text!r}: expected a non-empty subset of {FACTORS}")
    return factors


def select_factors(tensors: dict[str, Any], factors: tuple[str, ...]) -> dict[str, Any]:
    """Only the tensors of the given factors (FFA-LoRA sends B only, FedSA-LoRA A only)."""
    return {name: value for name, value in tensors.items() if factor_of(name) in factors}


def layout_for_rank(layout: dict[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """The same adapter at another rank: A is (r, in), B is (out, r)."""
    return {
        name: (rank, shape[1]) if factor_of(name) == LORA_A else (shape[0], rank)
        for name, shape in layout.items()
    }


def spec_for_rank(spec: LoraSpec, rank: int) -> LoraSpec:
    """An organization's own-rank spec. alpha scales with the rank so that the
    LoRA scaling alpha/r — and thus what B·A means — is the same for every rank."""
    return LoraSpec(rank=rank, alpha=spec.alpha * rank / spec.rank,
                    target_modules=spec.target_modules, dropout=spec.dropout)
