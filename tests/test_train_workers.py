"""`agent start --train-workers N`: the device split, its errors, and the round work's wiring."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from clients.node_config import TRAIN_USE_GPU_KEY, TRAIN_WORKERS_KEY
from clients.train_workers import (
    DevicePlan,
    NotEnoughResources,
    TrainWorkersError,
    check_capacity,
    plan_devices,
    plan_from_node_config,
)


def test_with_gpus_the_workers_take_them_and_the_actor_none() -> None:
    plan = plan_devices(gpus=4, train_workers=4)
    # an actor holding GPUs while it waits for workers that need them would deadlock
    assert plan.actor_gpus == 0 and plan.use_gpu and plan.worker_needs() == {"CPU": 4.0, "GPU": 4.0}
    assert plan_from_node_config(plan.node_config()) == DevicePlan(train_workers=4, use_gpu=True)
    single = plan_devices(gpus=2, train_workers=1)
    assert single.actor_gpus == 2 and not single.distributed and single.node_config() == {}
    assert plan_from_node_config({}) == DevicePlan()
    cpu = plan_devices(gpus=0, train_workers=2)
    assert not cpu.use_gpu and cpu.worker_needs() == {"CPU": 2.0}
    assert cpu.node_config() == {TRAIN_WORKERS_KEY: 2, TRAIN_USE_GPU_KEY: False}


def test_too_few_devices_are_named_errors_with_the_numbers() -> None:
    with pytest.raises(NotEnoughResources, match="3 train workers take one GPU each; --gpus gives 2"):
        plan_devices(gpus=2, train_workers=3)
    with pytest.raises(TrainWorkersError, match="must be ≥ 1"):
        plan_devices(gpus=0, train_workers=0)
    plan = plan_devices(gpus=0, train_workers=2)
    # a Ray the agent starts: one logical CPU beyond the cores for the (waiting) resident trainer
    assert plan.ray_cpus(2) == 3 and plan.ray_cpus(8) == 8 and DevicePlan().ray_cpus(2) == 2
    with pytest.raises(NotEnoughResources, match="2 train workers need a CPU core each; this machine has 1"):
        plan.ray_cpus(1)
    check_capacity(plan, {"CPU": 3.0}, {"CPU": 1.0})
    with pytest.raises(NotEnoughResources, match=r"need 2 CPU; the organization's Ray has 2, of which the "
                                                 r"resident trainer holds 1"):
        check_capacity(plan, {"CPU": 2.0}, {"CPU": 1.0})
    with pytest.raises(NotEnoughResources, match="need 2 GPU; the organization's Ray has 1"):
        check_capacity(plan_devices(gpus=2, train_workers=2), {"CPU": 8.0, "GPU": 1.0}, {"CPU": 1.0})


def test_the_agent_refuses_workers_without_its_ray() -> None:
    from clients.agent import Agent

    with pytest.raises(TrainWorkersError, match="drop --no-resident"):
        Agent("silo.jsonl", "127.0.0.1:1", resident=False, train_workers=2)
    assert Agent("silo.jsonl", "127.0.0.1:1", gpus=2, train_workers=2).plan.actor_gpus == 0


def test_agent_start_names_the_gpu_shortage_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli.main import main

    code = main(["agent", "start", "--insecure", "--coordinator", "127.0.0.1:1", "--data", "x.jsonl",
                 "--gpus", "1", "--train-workers", "2"])
    assert code == 2
    assert "NotEnoughResources: 2 train workers take one GPU each; --gpus gives 1" in capsys.readouterr().err


@pytest.mark.slow
def test_round_work_on_two_workers_gives_the_one_worker_adapter(ddp_ray, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The real train handler, the same instruction twice: in-process, then on 2 gloo workers."""
    from flwr.app import RecordDict

    from clients import round_work
    from clients.trainer import TrainSettings
    from protos import codec
    from protos.adapter import adapter_layout, init_adapter
    from protos.records import CONFIG_RECORD, SIMULATION_RECORD
    from runtime import base_model
    from server.job_config import JobConfig

    # fp32: bf16 rounding would differ between a batch of 4 and two batches of 2
    monkeypatch.setattr(round_work, "TrainSettings", functools.partial(TrainSettings, autocast_bf16=False))
    cfg = JobConfig(model="tiny-llama", job_id="ddp", lora_r=4, local_steps=3, batch_size=4,
                    max_length=64, sim_max_records=24, learning_rate=1e-2)
    start = init_adapter(adapter_layout(base_model.model_config(cfg.model), cfg.lora), seed=0)
    start = {k: v + np.float32(0.01) for k, v in start.items()}
    # FedProx and FFA-LoRA (A frozen): settings the workers must honour, not drop
    round_config = dataclasses.replace(cfg.round_config(1), proximal_mu=0.5, train_factors="lora_B")

    def train(workers: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        content = codec.encode(start, kind=codec.Kind.Value("GLOBAL"), job_id=cfg.job_id, server_round=1,
                               fingerprint=base_model.fingerprint(cfg.model), lora=cfg.lora)
        content[CONFIG_RECORD] = round_config.to_record()
        content[SIMULATION_RECORD] = cfg.simulation_settings().to_record()
        node = {"partition-id": 0, "num-partitions": 3, **plan_devices(0, workers).node_config()}
        header, update = codec.decode(round_work.train(content, node, RecordDict()))
        return update, dict(header.metrics)

    single, single_metrics = train(1)
    double, metrics = train(2)
    assert single_metrics["train_workers"] == 1.0 and metrics["train_workers"] == 2.0
    assert metrics["train_steps"] == single_metrics["train_steps"] == 3
    moved = max(float(np.abs(single[k] - start[k]).max()) for k in start)
    assert moved > 1e-3, "training did not move the adapter: the comparison would be vacuous"
    for name in single:
        if ".lora_A." in name:
            np.testing.assert_array_equal(double[name], start[name], err_msg=f"{name} is frozen")
        np.testing.assert_allclose(double[name], single[name], rtol=1e-4, atol=1e-5, err_msg=name)
