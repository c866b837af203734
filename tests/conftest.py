"""Shared test set-up: offline, quiet, and the tiny model everywhere it fits."""

from __future__ import annotations

import os

import pytest

# Nothing in the tests may reach a model hub; Ray must not touch accelerators.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray a test starts (its own, Flower's simulation, `flwr run`'s) listens on 127.0.0.1 only
# (clients/local_ray.py says why this variable does it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture
def ddp_ray():  # type: ignore[no-untyped-def]
    """A fresh local Ray with 2 CPUs for two Ray Train workers (gloo), shut down afterwards.

    (clients/distributed.py raises Ray Train's 60 s worker-group start limit for a busy CI host.)"""
    import ray

    if ray.is_initialized():  # never inherit another test's Ray
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
