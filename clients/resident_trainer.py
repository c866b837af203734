"""The resident trainer: the organization's base model, loaded once, on its Ray.

In a deployment Flower starts a new ClientApp process for every message, so a
ClientApp that loaded the model itself would reload it every round (seconds
for SmolLM2-135M, minutes for a 7B model). The agent instead starts this
named Ray actor once; it keeps the model on the organization's devices and
runs every instruction (clients/round_work.py). The ClientApp only connects
to the agent's Ray and forwards the instruction.

Node config written by `silotune agent start` (keys in clients/node_config.py):
``ray-address`` (the agent's Ray GCS address) and ``trainer-actor`` (the
actor's name, namespace ``silotune``); with ``--train-workers N`` > 1 also
``train-workers`` (N) and ``train-use-gpu``: the actor then trains each round
on N Ray Train workers (clients/train_workers.py, clients/distributed.py)
instead of in itself.
"""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from clients import resident, round_work
from clients.policy import PolicyViolation
from protos.errors import UpdateRejected
from clients.node_config import NAMESPACE, RAY_ADDRESS_KEY, TRAINER_ACTOR_KEY


class ResidentTrainer:
    """Runs instructions in a long-lived process that keeps the model (Ray actor body)."""

    def handle(self, kind: str, content: RecordDict, node_config: dict, state: RecordDict) -> tuple[RecordDict, RecordDict]:
        reply = round_work.HANDLERS[kind](content, node_config, state)
        return reply, state

    def base_model_loads(self) -> int:
        return resident.LOAD_COUNT


def actor_name(org: str) -> str:
    return f"silotune-trainer-{org}"


def start_resident_trainer(org: str, *, num_gpus: float = 0.0, num_cpus: float = 1.0) -> Any:
    """Create the organization's named trainer actor on the current Ray (the caller owns it:
    it lives as long as the agent's Ray driver)."""
    import ray

    actor_class = ray.remote(ResidentTrainer)
    return actor_class.options(name=actor_name(org), namespace=NAMESPACE, num_gpus=num_gpus,
                               num_cpus=num_cpus, max_concurrency=1).remote()


def run_on_resident_trainer(kind: str, content: RecordDict, node_config: dict, state: RecordDict) -> tuple[RecordDict, RecordDict]:
    """From a ClientApp process: hand the instruction to the agent's resident trainer."""
    import ray

    if not ray.is_initialized():
        ray.init(address=str(node_config[RAY_ADDRESS_KEY]), namespace=NAMESPACE,
                 log_to_driver=False, include_dashboard=False)
    actor = ray.get_actor(str(node_config[TRAINER_ACTOR_KEY]), namespace=NAMESPACE)
    try:
        return ray.get(actor.handle.remote(kind, content, dict(node_config), state))
    except PolicyViolation as refusal:  # Ray's copy carries the actor's traceback: the reply names the rule only
        raise PolicyViolation(refusal.rule, refusal.detail) from None
    except UpdateRejected as refusal:  # likewise: the reason and its detail, without the traceback
        raise UpdateRejected(refusal.reason, refusal.detail) from None
