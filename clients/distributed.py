"""Several devices of one organization train one adapter: Ray Train + DDP.

Flower only splits GPUs *between* virtual organizations; an organization with
several GPUs (or CPU hosts) trains its own adapter across them here, with Ray
Train's TorchTrainer (``ScalingConfig(num_workers=N, use_gpu=...)``) and
PyTorch DDP (gloo on CPU, nccl on GPU). Each worker runs the same trainer as a
single process (clients/trainer.py) on its shard of every batch; gradients are
all-reduced, so N workers produce the same adapter as one worker on the same
data and seed, up to floating-point reduction order.

Every setting of TrainSettings reaches the workers unchanged (the whole
object travels in ``train_loop_config``): trained factors (FFA-LoRA), the
FedProx term, bf16 autocast, the per-organization seed.

Cost: TorchTrainer starts a fresh worker group for every ``fit()``, so each
call (each round, from the agent) starts N processes that import torch and
load the base model again; the caller's resident model is not reused, so
multi-worker training pays off only when a round's training outweighs that
start (figures: benchmarks/RESULTS.md). The ``train_wall_seconds`` metric
shows this overhead in every reply.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

from clients.formatting import EncodedExample
from clients.trainer import TrainSettings
from protos.adapter import Adapter, LoraSpec

_RESULT = "result.pkl"
# Ray Train gives a worker group 60 s to start; N processes importing torch and loading a
# model on a busy host can take longer. The caller checks resources first (clients/train_workers.py),
# so this only waits for slow starts, not for workers Ray cannot place. An operator's value wins.
WORKER_GROUP_START_TIMEOUT = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: load the resident model, train its shard under DDP."""
    import ray.train
    import ray.train.torch

    from clients.resident import get_resident
    from clients.trainer import Shard, train_adapter

    context = ray.train.get_context()
    resident = get_resident(config["model"], config["spec"])
    device = ray.train.torch.get_device()
    resident.model.to(device)

    def wrap(model: Any) -> Any:
        # DDP over the trainable (LoRA) parameters; move_to_device done above
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp")

    adapter, metrics = train_adapter(
        resident, config["global_adapter"], config["examples"], config["settings"],
        shard=Shard(context.get_world_rank(), context.get_world_size()), wrap=wrap,
    )
    if context.get_world_rank() == 0:
        Path(config["out_dir"], _RESULT).write_bytes(pickle.dumps((adapter, metrics)))


def train_adapter_distributed(
    model: str,
    spec: LoraSpec,
    global_adapter: Adapter,
    examples: list[EncodedExample],
    settings: TrainSettings,
    *,
    num_workers: int,
    use_gpu: bool = False,
) -> tuple[Adapter, dict[str, float]]:
    """Train one adapter on ``num_workers`` devices of this organization."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault(*WORKER_GROUP_START_TIMEOUT)  # read by fit(), passed on to the workers
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="silotune-ddp-") as out_dir:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "model": model, "spec": spec, "global_adapter": global_adapter,
                "examples": examples, "settings": settings, "out_dir": out_dir,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=str(Path(out_dir) / "ray"), name="silotune-ddp"),
        )
        trainer.fit()
        adapter, metrics = pickle.loads(Path(out_dir, _RESULT).read_bytes())
    metrics["train_workers"] = float(num_workers)
    # train_seconds is rank 0's loop; this adds the worker group's start and model loads
    metrics["train_wall_seconds"] = time.perf_counter() - started
    return adapter, metrics
