"""Local LoRA training on the silo's train split (transformers + peft).

One call trains ``local_steps`` optimizer steps starting from the global
adapter and returns the trained adapter. A fresh AdamW each round (the usual
choice in federated fine-tuning: optimizer state would otherwise drift per
organization). Batches come from a permutation seeded by (job seed, round,
organization), so a round is reproducible. bf16 autocast speeds up training
on CPUs with bf16 support; master weights stay fp32.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from clients.formatting import EncodedExample, collate
from clients.resident import ResidentModel
from protos.adapter import Adapter

log = logging.getLogger("silotune.client")


@dataclass(frozen=True)
class TrainSettings:
    local_steps: int
    batch_size: int
    learning_rate: float
    seed: int                      # derive from (job seed, round, organization)
    autocast_bf16: bool = True
    trained_factors: tuple[str, ...] = ("lora_A", "lora_B")   # FFA-LoRA freezes A
    proximal_mu: float = 0.0       # FedProx: adds μ/2·‖w − w_global‖² over the trained factors


def batch_order(num_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices for each step: seeded permutations, cycled as often as needed."""
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    order: list[int] = []
    while len(order) < needed:
        order.extend(rng.permutation(num_examples).tolist())
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def train_adapter(
    resident: ResidentModel,
    global_adapter: Adapter,
    examples: list[EncodedExample],
    settings: TrainSettings,
) -> tuple[Adapter, dict[str, float]]:
    """Train from ``global_adapter``; return the new adapter and scalar metrics."""
    import torch

    if not examples:
        raise ValueError("no training examples")
    model = resident.model
    resident.load_adapter(global_adapter)
    named = {name: p for name, p in model.named_parameters()
             if any(f".{factor}." in name for factor in settings.trained_factors)}
    params = list(named.values())
    for p in params:
        p.requires_grad_(True)
    anchors = _proximal_anchors(named, global_adapter) if settings.proximal_mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    torch.manual_seed(settings.seed)  # dropout, if any
    pad_id = resident.tokenizer.pad_token_id
    model.train()
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    try:
        for indices in batch_order(len(examples), settings.local_steps, settings.batch_size, settings.seed):
            batch = collate([(examples[i].input_ids, examples[i].labels) for i in indices], pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.autocast_bf16):
                loss = model(**batch).loss
            objective = loss
            if anchors:
                proximal = sum(((p - anchor) ** 2).sum() for p, anchor in anchors)
                objective = loss + 0.5 * settings.proximal_mu * proximal
            objective.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens += int(batch["attention_mask"].sum())
    finally:
        model.eval()
        for p in params:
            p.requires_grad_(False)
    seconds = time.perf_counter() - started
    metrics = {
        "train_loss": float(np.mean(losses)),
        "train_loss_last": losses[-1],
        "train_steps": float(len(losses)),
        "train_tokens": float(tokens),
        "train_seconds": seconds,
        "train_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }
    return resident.adapter(), metrics


def _proximal_anchors(named: dict, global_adapter: Adapter) -> list:  # type: ignore[type-arg]
    """(parameter, its value in the global adapter) pairs for the FedProx term.

    PEFT names parameters ``...lora_A.default.weight``; adapter keys drop the
    adapter name (``...lora_A.weight``).
    """
    import torch

    pairs = []
    for name, parameter in named.items():
        key = name.replace(".default.", ".")
        pairs.append((parameter, torch.from_numpy(global_adapter[key]).to(parameter.dtype)))
    return pairs
