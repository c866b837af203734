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
from typing import Any, Callable

import numpy as np

from clients.formatting import EncodedExample, collate
from clients.resident import ResidentModel
from protos.adapter import Adapter

log = logging.getLogger("silotune.client")


@dataclass(frozen=True)
class Shard:
    """This worker's part of each batch when several train one adapter (DDP)."""

    rank: int = 0
    world: int = 1


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


def _answer_tokens(example: EncodedExample) -> int:
    """Tokens the loss is taken over (labels are shifted by one inside the model)."""
    return sum(1 for label in example.labels[1:] if label != -100)


def train_adapter(
    resident: ResidentModel,
    global_adapter: Adapter,
    examples: list[EncodedExample],
    settings: TrainSettings,
    *,
    shard: Shard = Shard(),
    wrap: Callable[[Any], Any] | None = None,
) -> tuple[Adapter, dict[str, float]]:
    """Train from ``global_adapter``; return the new adapter and scalar metrics.

    With ``shard``/``wrap`` (clients/distributed.py) several workers train one
    adapter: every worker draws the same batch indices and takes every
    ``world``-th example; its loss is scaled by its share of the batch's answer
    tokens, so the gradients DDP averages equal the one-worker gradient of the
    whole batch.
    """
    import torch

    if not examples:
        raise ValueError("no training examples")
    if settings.batch_size < shard.world:
        raise ValueError(f"batch size {settings.batch_size} < {shard.world} workers: some would get no example")
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
    module = wrap(model) if wrap is not None else model
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    try:
        for indices in batch_order(len(examples), settings.local_steps, settings.batch_size, settings.seed):
            mine = indices[shard.rank :: shard.world]
            batch = collate([(examples[i].input_ids, examples[i].labels) for i in mine], pad_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.autocast_bf16):
                loss = module(**batch).loss
            share = sum(_answer_tokens(examples[i]) for i in mine) / sum(_answer_tokens(examples[i]) for i in indices)
            objective = loss * (share * shard.world) if shard.world > 1 else loss
            if anchors:  # on top of the share-scaled loss: DDP averages the same proximal gradient back
                proximal = sum(((p - anchor) ** 2).sum() for p, anchor in anchors)
                objective = objective + 0.5 * settings.proximal_mu * proximal
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
        pairs.append((parameter, torch.tensor(global_adapter[key]).to(parameter.device, parameter.dtype)))
    return pairs
