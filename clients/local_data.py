"""This organization's data for a round: its silo, split, tokenized, cached.

Deployment: the agent's node config names the silo file (``silo-path``).
Simulation: Flower gives each virtual organization a ``partition-id``, and
its silo is that partition of a public corpus (``clients.silo.virtual``).
Either way the train/test split is made here and never leaves the process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from clients.formatting import EncodedExample, encode_example
from clients.node_config import NUM_PARTITIONS_KEY, ORG_NAME_KEY, PARTITION_ID_KEY, RANK_KEY, SILO_PATH_KEY
from clients.silo import Silo, load_silo, split_silo, virtual_silo
from protos.round_config import RoundConfig, SimulationSettings

log = logging.getLogger("silotune.client")


@dataclass
class LocalData:
    org_name: str
    silo: Silo
    train: list[EncodedExample]
    test: list[EncodedExample]
    test_labels: list[str] | None


_CACHE: dict[tuple[Any, ...], LocalData] = {}


def org_name(node_config: Mapping[str, Any]) -> str:
    if ORG_NAME_KEY in node_config:
        return str(node_config[ORG_NAME_KEY])
    if PARTITION_ID_KEY in node_config:
        return f"org-{int(node_config[PARTITION_ID_KEY])}"
    return "organization"


def local_rank(node_config: Mapping[str, Any], cfg: RoundConfig, sim: SimulationSettings | None) -> int:
    """The LoRA rank this organization trains: its own setting, else the job's.

    Deployment: node config ``lora-rank`` (what the organization's GPUs afford).
    Simulation: ``sim_ranks`` ("4,8,16") assigned round-robin by partition.
    """
    if RANK_KEY in node_config:
        return int(node_config[RANK_KEY])
    if sim is not None and sim.sim_ranks and PARTITION_ID_KEY in node_config:
        ranks = [int(r) for r in sim.sim_ranks.split(",") if r.strip()]
        return ranks[int(node_config[PARTITION_ID_KEY]) % len(ranks)]
    return cfg.lora_r


def load_local_silo(node_config: Mapping[str, Any], cfg: RoundConfig, sim: SimulationSettings | None) -> Silo:
    if SILO_PATH_KEY in node_config:
        return load_silo(str(node_config[SILO_PATH_KEY]))
    if PARTITION_ID_KEY in node_config:
        if sim is None:
            raise ValueError("a virtual organization (partition-id) needs the simulation settings, "
                             "which only a simulation's coordinator sends")
        return virtual_silo(
            sim.sim_dataset,
            int(node_config[PARTITION_ID_KEY]),
            int(node_config[NUM_PARTITIONS_KEY]),
            skew=sim.sim_skew,
            max_records=sim.sim_max_records or None,
            seed=cfg.seed,
        )
    raise ValueError(
        f"this node has no data: set node config {SILO_PATH_KEY}=\"/path/to/silo.jsonl\" "
        "(deployment) or run it in simulation (partition-id)"
    )


def local_data(node_config: Mapping[str, Any], cfg: RoundConfig, sim: SimulationSettings | None,
               tokenizer: Any) -> LocalData:
    """The split, tokenized silo of this organization (cached per process)."""
    key = (
        tuple(sorted((k, str(v)) for k, v in node_config.items())),
        cfg.model, cfg.max_length, cfg.test_fraction, cfg.seed,
        (sim.sim_dataset, sim.sim_skew, sim.sim_max_records) if sim is not None else None,
    )
    if key in _CACHE:
        return _CACHE[key]
    silo = load_local_silo(node_config, cfg, sim)
    train, test = split_silo(silo, test_fraction=cfg.test_fraction, seed=cfg.seed)
    train_ids = [encode_example(tokenizer, e.prompt, e.answer, cfg.max_length) for e in train.examples]
    test_ids = [encode_example(tokenizer, e.prompt, e.answer, cfg.max_length) for e in test.examples]
    cut = sum(e.truncated for e in train_ids + test_ids)
    if cut:
        log.warning("%d of %d examples were longer than max_length=%d tokens and were truncated",
                    cut, len(train_ids) + len(test_ids), cfg.max_length)
    data = LocalData(
        org_name=org_name(node_config),
        silo=silo,
        train=train_ids,
        test=test_ids,
        test_labels=[e.label for e in test.examples] if silo.task == "classification" else None,  # type: ignore[misc]
    )
    _CACHE[key] = data
    return data
