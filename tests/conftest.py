"""Shared test set-up: offline, quiet, and the tiny model everywhere it fits."""

from __future__ import annotations

import os

# Nothing in the tests may reach a model hub; Ray must not touch accelerators.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray a test starts (its own, Flower's simulation, `flwr run`'s) listens on 127.0.0.1 only
# (clients/local_ray.py says why this variable does it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
