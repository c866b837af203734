"""Every node-config key an organization's ClientApp reads, in one place.

A Flower node config is the per-organization settings the SuperNode hands
to each ClientApp process (``context.node_config``). Two writers fill it:
`silotune agent start` (clients/agent.py, through the SuperNode's
``--node-config``) in a deployment, and Flower's Simulation Engine for each
virtual organization in a simulation. The keys, who writes and who reads them:

``silo-path`` (SILO_PATH_KEY)
    The organization's silo file: one dataset, named by the file's stem.
    Written by `silotune agent start --data FILE` (one bare file, as before
    named datasets existed); read by clients/local_data.py and
    clients/policy.py (``offered_silos``).
``silo-paths`` (SILO_PATHS_KEY)
    The named datasets the agent offers, ``name=/abs/path;name2=/abs/path2``
    (``render_silo_paths``, ``parse_silo_paths``): Flower node-config values
    are scalars, so the mapping travels as one string. Names match
    ``[A-Za-z0-9._-]+`` (no ``=``, no ``;``), so each entry splits at its first
    ``=``; a path may hold ``=`` but not ``;`` (refused when written). Written
    by `silotune agent start --data NAME=FILE ...` (any named or several
    datasets); read by clients/local_data.py (the file of the job's
    ``dataset``) and clients/policy.py (the names a job may ask for). A node
    config sets ``silo-path`` or ``silo-paths``, not both.
``org-name`` (ORG_NAME_KEY)
    The organization's name in the coordinator's report. Written by
    `silotune agent start` (``--name``, default the silo file's stem); read by
    clients/local_data.py.
``lora-rank`` (RANK_KEY)
    The LoRA rank this organization trains in heterogeneous-rank jobs. Written
    by `silotune agent start --rank`; read by clients/local_data.py.
``ray-address`` (RAY_ADDRESS_KEY), ``trainer-actor`` (TRAINER_ACTOR_KEY)
    The agent's Ray GCS address and the name of its resident trainer actor
    (in Ray namespace NAMESPACE). Written by `silotune agent start` unless
    ``--no-resident``; read by clients/app.py (whether to forward at all) and
    clients/resident_trainer.py (where to forward).
``train-workers`` (TRAIN_WORKERS_KEY), ``train-use-gpu`` (TRAIN_USE_GPU_KEY)
    Train each round on N Ray Train workers, on one GPU each or not. Written
    by `silotune agent start --train-workers N` (N > 1) through
    clients/train_workers.py's DevicePlan; read by clients/train_workers.py
    (``plan_from_node_config``) for clients/round_work.py.
``policy-path`` (POLICY_PATH_KEY)
    The organization's policy file: what its agent accepts from a coordinator
    (clients/policy.py). Written by `silotune agent start --policy FILE`
    (validated at start); read by clients/policy.py (``policy_for``) for
    clients/round_work.py. Absent: the safe default policy; a virtual
    organization (``partition-id``) gets the permissive simulation policy.
``state-dir`` (STATE_DIR_KEY)
    The agent's state directory (``--state-dir``). Written by `silotune agent
    start`; read by clients/privacy.py: the agent's own ε ledger
    (``privacy-ledger.json``, 0600) lives there, across jobs and restarts.
``signing-key`` (SIGNING_KEY_KEY)
    The organization's node private key (ORG.key, the one that authenticates
    its SuperNode), which signs its secure-aggregation keys and survivor sets.
    Written by `silotune agent start` (its ``--private-key``); read by
    clients/secure_aggregation.py. Absent (``--insecure``, simulation): unsigned.
``trusted-peers`` (TRUSTED_PEERS_KEY)
    A file of the peer organizations' public keys (their ORG.pub lines) or
    ``SHA256:`` fingerprints, distributed out of band: secure-aggregation
    sessions must be signed by them (protos/secagg/identity.py). Written by
    `silotune agent start --trusted-peers FILE`; read by
    clients/secure_aggregation.py. Absent: peers' signatures are not checked.
``dp-noise-seed`` (NOISE_SEED_KEY)
    Makes the local differential-privacy noise reproducible. Written by no
    silotune command: an operator (or a test) sets it by hand; read by
    clients/privacy.py.
``partition-id`` (PARTITION_ID_KEY), ``num-partitions`` (NUM_PARTITIONS_KEY)
    A virtual organization's index and the federation's size. Written by
    Flower's Simulation Engine; read by clients/local_data.py (the virtual
    silo, the name, the rank) and clients/attacks.py (simulated attackers).
    A deployed agent never has them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SILO_PATH_KEY = "silo-path"
SILO_PATHS_KEY = "silo-paths"
ORG_NAME_KEY = "org-name"
RANK_KEY = "lora-rank"

NAMESPACE = "silotune"  # the Ray namespace of the resident trainer actor (not a key itself)
RAY_ADDRESS_KEY = "ray-address"
TRAINER_ACTOR_KEY = "trainer-actor"
TRAIN_WORKERS_KEY = "train-workers"
TRAIN_USE_GPU_KEY = "train-use-gpu"

NOISE_SEED_KEY = "dp-noise-seed"

POLICY_PATH_KEY = "policy-path"
STATE_DIR_KEY = "state-dir"

SIGNING_KEY_KEY = "signing-key"
TRUSTED_PEERS_KEY = "trusted-peers"

PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"


# ---- named datasets (``silo-paths``) ---------------------------------------------------

#: what a dataset name may hold: no ``=`` or ``;`` (the separators of ``silo-paths``), no space, no slash
DATASET_NAME = re.compile(r"[A-Za-z0-9._-]+")
#: between two ``name=path`` entries of ``silo-paths``; names cannot hold it, paths are refused if they do
DATASETS_SEPARATOR = ";"


class DatasetError(ValueError):
    """Named datasets that cannot be used: a bad or duplicate name, a path the node config cannot carry,
    a job's ``dataset`` this node does not offer or cannot choose alone."""


def check_dataset_name(name: str) -> str:
    if not DATASET_NAME.fullmatch(name):
        raise DatasetError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def render_silo_paths(datasets: Mapping[str, str | Path]) -> str:
    """{name: path} → ``name=path;name2=path2`` (the value of ``silo-paths``)."""
    entries = []
    for name, path in datasets.items():
        check_dataset_name(name)
        if DATASETS_SEPARATOR in str(path):
            raise DatasetError(f"dataset {name!r}: its path {str(path)!r} holds {DATASETS_SEPARATOR!r}, which "
                               f"separates datasets in node config {SILO_PATHS_KEY}: rename or link the file")
        entries.append(f"{name}={path}")
    if not entries:
        raise DatasetError("no dataset to offer")
    return DATASETS_SEPARATOR.join(entries)


def parse_silo_paths(value: str) -> dict[str, str]:
    """The value of ``silo-paths`` → {name: path}, in the agent's order."""
    datasets: dict[str, str] = {}
    for entry in value.split(DATASETS_SEPARATOR):
        name, sep, path = entry.partition("=")
        if not sep or not path:
            raise DatasetError(f"node config {SILO_PATHS_KEY}: {entry!r} is not name=path")
        if check_dataset_name(name) in datasets:
            raise DatasetError(f"node config {SILO_PATHS_KEY}: dataset {name!r} is named twice")
        datasets[name] = path
    return datasets


def offered_silos(node_config: Mapping[str, Any]) -> dict[str, str]:
    """The datasets this node offers, {name: silo file}: ``silo-paths``, else ``silo-path`` (named by
    its file's stem), else none (a virtual organization of a simulation)."""
    if SILO_PATHS_KEY in node_config:
        if SILO_PATH_KEY in node_config:
            raise DatasetError(f"node config sets both {SILO_PATH_KEY} and {SILO_PATHS_KEY}: give one")
        return parse_silo_paths(str(node_config[SILO_PATHS_KEY]))
    if SILO_PATH_KEY in node_config:
        path = str(node_config[SILO_PATH_KEY])
        return {Path(path).stem: path}
    return {}
