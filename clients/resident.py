"""The base model with its LoRA adapter, kept resident in this process.

Loading the base model is the expensive part of a round (seconds for
SmolLM2-135M, minutes for a 7B model). In simulation each Ray actor serves
many virtual organizations, so the model is cached per process (and LoRA rank) —
never per organization — and each round only swaps the adapter tensors in.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from protos.adapter import Adapter, LoraSpec
from runtime import base_model

log = logging.getLogger("silotune.client")

# transformers 5.23 warns about its own deprecated attribute when PEFT wraps a model.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

#: how many times this process loaded a base model (tests count real loads)
LOAD_COUNT = 0

#: "cpu", "cuda" or "cuda:N" to pin the resident model; unset: the first visible GPU, else the CPU
DEVICE_VAR = "SILOTUNE_DEVICE"


def choose_device() -> Any:
    """Where the resident model lives. In the agent's trainer actor Ray has set
    CUDA_VISIBLE_DEVICES to the GPUs given with ``--gpus``, so "the first visible
    GPU" is one of the organization's own."""
    import torch

    wanted = os.environ.get(DEVICE_VAR, "").strip()
    if not wanted:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError:
        raise ValueError(f"{DEVICE_VAR}={wanted!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_VAR}={wanted!r}: only cpu and cuda devices are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{DEVICE_VAR}={wanted!r} but torch sees no CUDA device (torch {torch.__version__})")
    return device


@dataclass
class ResidentModel:
    name: str
    lora: LoraSpec
    tokenizer: Any
    model: Any              # peft.PeftModel around the frozen base model, on ``device``
    fingerprint: str
    layout: dict[str, tuple[int, ...]]
    lock: threading.Lock    # one round at a time on this model

    def load_adapter(self, adapter: Adapter) -> None:
        import torch
        from peft import set_peft_model_state_dict

        # torch.tensor copies: decoded arrays may be read-only views of a message
        state = {name: torch.tensor(np.asarray(value, dtype=np.float32)) for name, value in adapter.items()}
        result = set_peft_model_state_dict(self.model, state)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise ValueError(f"adapter tensors the model does not have: {unexpected[:3]}")

    def adapter(self) -> Adapter:
        return adapter_of(self.model)


def adapter_of(peft_model: Any) -> Adapter:
    """The LoRA tensors of a PeftModel as float32 numpy arrays, by PEFT key."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: otherwise PEFT may look the base model up on the Hub
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {name: state[name].detach().to("cpu").float().numpy().copy() for name in sorted(state)}


#: How many (base model, LoRA spec) pairs one process keeps loaded. A deployed
#: organization has one; a heterogeneous-rank simulation (HetLoRA/FlexLoRA, ranks
#: 4/8/16) has one per rank, and each Ray actor serves organizations of every rank in
#: turn — keeping only the last one reloaded the base model on nearly every call.
MAX_RESIDENT_SPECS = int(os.environ.get("SILOTUNE_RESIDENT_SPECS", "3"))

_RESIDENT: "OrderedDict[tuple[str, LoraSpec], ResidentModel]" = OrderedDict()
_GUARD = threading.Lock()


def get_resident(name: str, lora: LoraSpec) -> ResidentModel:
    """The process-wide model for (base model, LoRA spec), loaded on first use."""
    global LOAD_COUNT
    key = (name, lora)
    with _GUARD:
        if key in _RESIDENT:
            _RESIDENT.move_to_end(key)
            return _RESIDENT[key]
        from peft import LoraConfig, get_peft_model

        while len(_RESIDENT) >= max(1, MAX_RESIDENT_SPECS):  # least recently used spec goes
            _RESIDENT.popitem(last=False)
        model = base_model.load_model(name)
        LOAD_COUNT += 1
        fingerprint = base_model.fingerprint(name, model=model)
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                target_modules=list(lora.target_modules),
                lora_dropout=lora.dropout,
                task_type="CAUSAL_LM",
            ),
        )
        peft_model.to(choose_device())
        peft_model.eval()
        resident = ResidentModel(
            name=name,
            lora=lora,
            tokenizer=base_model.load_tokenizer(name),
            model=peft_model,
            fingerprint=fingerprint,
            layout={k: tuple(v.shape) for k, v in adapter_of(peft_model).items()},
            lock=threading.Lock(),
        )
        log.info("loaded base model %s (%s) with LoRA r=%d on %s", name, fingerprint, lora.rank,
                 next(peft_model.parameters()).device)
        _RESIDENT[key] = resident
        return resident

