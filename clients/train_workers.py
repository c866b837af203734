"""How an organization's devices are split when several workers train its adapter.

With ``train-workers`` N > 1 the resident trainer does not train itself: each
round it starts N Ray Train workers (clients/distributed.py) on the agent's
Ray and waits for them. The rules, in one place because both the agent (at
start) and the round work (each round) apply them:

- GPUs: each worker takes one whole GPU, so ``--gpus`` must be ≥ N, and the
  resident trainer actor holds none. An actor holding the GPUs while it waits
  for workers that need them would wait forever: Ray could never schedule the
  workers. (Evaluation then runs on the actor's CPU.)
- CPUs: each worker takes one CPU and the resident trainer keeps its one, so
  the Ray needs N + 1. The actor only waits while the workers train, so a Ray
  the agent starts itself counts one CPU more than the cores for it rather
  than refusing N = cores; N workers on fewer cores are refused.

Too few resources are a :class:`NotEnoughResources` naming the numbers, at
agent start and again before each round's workers are asked for — never a
wait for workers Ray cannot place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from clients.node_config import TRAIN_USE_GPU_KEY, TRAIN_WORKERS_KEY


class TrainWorkersError(ValueError):
    """train-workers cannot be honoured as configured."""


class NotEnoughResources(TrainWorkersError):
    """The organization's Ray lacks the CPUs or GPUs the train workers need."""


@dataclass(frozen=True)
class DevicePlan:
    train_workers: int = 1
    use_gpu: bool = False          # workers train on one GPU each
    actor_gpus: float = 0.0        # what the resident trainer actor holds
    actor_cpus: float = 1.0

    @property
    def distributed(self) -> bool:
        return self.train_workers > 1

    def worker_needs(self) -> dict[str, float]:
        """What the round's workers need from Ray besides what the actor holds."""
        if not self.distributed:
            return {}
        return {"CPU": float(self.train_workers), **({"GPU": float(self.train_workers)} if self.use_gpu else {})}

    def node_config(self) -> dict[str, object]:
        return {TRAIN_WORKERS_KEY: self.train_workers, TRAIN_USE_GPU_KEY: self.use_gpu} if self.distributed else {}

    def ray_cpus(self, cores: int) -> int:
        """CPUs for a Ray the agent starts itself on a machine with ``cores`` cores."""
        if self.train_workers > cores:
            raise NotEnoughResources(f"{self.train_workers} train workers need a CPU core each; this machine has {cores}")
        return max(cores, self.train_workers + int(self.actor_cpus)) if self.distributed else cores


def plan_devices(gpus: float, train_workers: int) -> DevicePlan:
    """The split for ``agent start --gpus G --train-workers N``."""
    if train_workers < 1:
        raise TrainWorkersError(f"train workers must be ≥ 1, got {train_workers}")
    if train_workers == 1:
        return DevicePlan(actor_gpus=gpus)
    if 0 < gpus < train_workers:
        raise NotEnoughResources(f"{train_workers} train workers take one GPU each; --gpus gives {gpus:g}")
    return DevicePlan(train_workers=train_workers, use_gpu=gpus > 0, actor_gpus=0.0)


def plan_from_node_config(node_config: Mapping[str, object]) -> DevicePlan:
    """What the agent decided, as the round work sees it (node config)."""
    workers = int(node_config.get(TRAIN_WORKERS_KEY, 1))  # type: ignore[call-overload]
    if workers < 1:
        raise TrainWorkersError(f"node config {TRAIN_WORKERS_KEY}={workers}: must be ≥ 1")
    return DevicePlan(train_workers=workers, use_gpu=bool(node_config.get(TRAIN_USE_GPU_KEY, False)))


def check_capacity(plan: DevicePlan, total: Mapping[str, float], held: Mapping[str, float]) -> None:
    """Raise unless ``total`` (a Ray's resources) minus ``held`` (the resident trainer's) fits the workers."""
    for resource, needed in plan.worker_needs().items():
        free = float(total.get(resource, 0.0)) - float(held.get(resource, 0.0))
        if free < needed:
            raise NotEnoughResources(
                f"{plan.train_workers} train workers need {needed:g} {resource}; the organization's Ray has "
                f"{float(total.get(resource, 0.0)):g}, of which the resident trainer holds {float(held.get(resource, 0.0)):g}")
