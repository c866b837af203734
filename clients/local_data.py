"""This organization's data for a round: its silo, split, tokenized, cached.

Deployment: the agent's node config names its silo files (``silo-paths``,
or one ``silo-path``) and the job's ``dataset`` picks one (``choose_silo_path``).
Simulation: Flower gives each virtual organization a ``partition-id``, and
its silo is that partition of a public corpus (``clients.silo.virtual``).
Either way the train/test split is made here and never leaves the process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from clients.formatting import EncodedExample, encode_example, prompt_format
from clients.node_config import (NUM_PARTITIONS_KEY, ORG_NAME_KEY, PARTITION_ID_KEY, RANK_KEY, SILO_PATH_KEY,
                                 SILO_PATHS_KEY, DatasetError, offered_silos)
from clients.silo import Example, Silo, load_silo, split_silo, virtual_silo
from protos.round_config import RoundConfig, SimulationSettings
from protos.task_spec import TaskSpec, TaskSpecError

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
    """This organization's silo, built under the job's task spec (protos/task_spec.py)."""
    spec = task_spec(cfg, sim)
    if SILO_PATH_KEY in node_config or SILO_PATHS_KEY in node_config:
        return load_silo(choose_silo_path(node_config, cfg.dataset), spec=spec)
    if PARTITION_ID_KEY in node_config:
        if sim is None:
            raise ValueError("a virtual organization (partition-id) needs the simulation settings, "
                             "which only a simulation's coordinator sends")
        if sim.sim_data:  # the user's own data, split among the virtual organizations
            from clients.silo.partition import partition_silo  # here: the rest of this module never needs it

            return partition_silo(sim.sim_data, int(node_config[PARTITION_ID_KEY]),
                                  int(node_config[NUM_PARTITIONS_KEY]), sim.sim_partitioner, seed=cfg.seed,
                                  spec=spec)
        return virtual_silo(
            sim.sim_dataset,
            int(node_config[PARTITION_ID_KEY]),
            int(node_config[NUM_PARTITIONS_KEY]),
            skew=sim.sim_skew,
            max_records=sim.sim_max_records or None,
            seed=cfg.seed,
            spec=spec,
        )
    raise ValueError(
        f"this node has no data: set node config {SILO_PATH_KEY}=\"/path/to/silo.jsonl\" "
        "(deployment) or run it in simulation (partition-id)"
    )


class UnknownDataset(DatasetError):
    """The job names a dataset this agent does not offer."""


class AmbiguousDataset(DatasetError):
    """The job names no dataset and this agent offers several."""


def choose_silo_path(node_config: Mapping[str, Any], dataset: str) -> str:
    """The silo file of the job's ``dataset``: the one so named; "" → the agent's only one.

    The policy (clients/policy.py, rule ``datasets``) refuses both errors below before anything is
    loaded; they stand here for a node whose policy did not see its datasets. The names stay in
    this organization's log: the coordinator learns the error's type only (clients/app.py)."""
    offered = offered_silos(node_config)
    names = ", ".join(offered)
    if dataset:
        if dataset not in offered:
            raise UnknownDataset(f"the job asks for dataset {dataset!r}; this agent offers {names} "
                                 "(agent start --data NAME=FILE)")
        return offered[dataset]
    if len(offered) != 1:
        raise AmbiguousDataset(f"the job names no dataset and this agent offers {len(offered)}: {names}; "
                               "the job's `dataset` must name one")
    return next(iter(offered.values()))


def task_spec(cfg: RoundConfig, sim: SimulationSettings | None) -> TaskSpec:
    """The job's task spec; a deployed classification job must name its labels.

    Without a label set each organization would list the labels of its own
    file in its prompts, and organizations holding different subsets would
    train on different prompts. A simulation's virtual organizations share
    the corpus-wide set instead, so only a deployment is refused."""
    spec = TaskSpec.from_config(cfg)
    if spec.kind == "classification" and not spec.labels and sim is None:
        raise TaskSpecError("the job says task=classification but declares no task-labels: every organization "
                            "would render its prompts with the labels of its own file. The coordinator sets "
                            "task-labels (comma-separated or a JSON array)")
    if spec.kind == "auto" and not spec.labels and sim is None:
        log.warning("the job declares no task and no task-labels: a classification file is rendered with its own "
                    "labels, which other organizations may not share (set task and task-labels on the job)")
    return spec


def encode_examples(tokenizer: Any, examples: list[Example], cfg: RoundConfig) -> list[EncodedExample]:
    return [encode_example(tokenizer, e.prompt, e.answer, cfg.max_length, messages=e.messages,
                           system_prompt=cfg.system_prompt) for e in examples]


def log_truncation(encoded: list[EncodedExample], max_length: int) -> None:
    """Say how much was cut, and that it is by design: the middle of a long
    prompt goes (formatting.py), its head and its question's end stay, the
    answer is whole. A warning only when answers themselves were cut."""
    cut = [e for e in encoded if e.truncated]
    if not cut:
        return
    answers_cut = sum(e.answer_truncated for e in cut)
    log.info("%d of %d examples exceed max-length=%d tokens: the middle of their prompt is left out "
             "(the instruction, the end of the text and the answer are kept)", len(cut), len(encoded), max_length)
    if answers_cut:
        log.warning("%d answers were cut at max-length=%d // 2 tokens: raise max-length to train on whole "
                    "answers", answers_cut, max_length)


def local_data(node_config: Mapping[str, Any], cfg: RoundConfig, sim: SimulationSettings | None,
               tokenizer: Any) -> LocalData:
    """The split, tokenized silo of this organization (cached per process)."""
    spec = TaskSpec.from_config(cfg)
    key = (
        tuple(sorted((k, str(v)) for k, v in node_config.items())),
        cfg.dataset, cfg.model, cfg.max_length, cfg.test_fraction, cfg.seed, spec.fingerprint(),
        (sim.sim_dataset, sim.sim_skew, sim.sim_max_records, sim.sim_data, sim.sim_partitioner)
        if sim is not None else None,
    )
    if key in _CACHE:
        return _CACHE[key]
    silo = load_local_silo(node_config, cfg, sim)
    train, test = split_silo(silo, test_fraction=cfg.test_fraction, seed=cfg.seed)
    train_ids = encode_examples(tokenizer, train.examples, cfg)
    test_ids = encode_examples(tokenizer, test.examples, cfg)
    log_truncation(train_ids + test_ids, cfg.max_length)
    # the same line at every organization of a job: what its spec makes of every row
    log.info("%s: %d %s examples; task %s renders each as %r", org_name(node_config), len(silo), silo.task,
             spec.fingerprint()[:16], prompt_format(spec, silo.task, silo.labels, tokenizer))
    data = LocalData(
        org_name=org_name(node_config),
        silo=silo,
        train=train_ids,
        test=test_ids,
        test_labels=[e.label for e in test.examples] if silo.task == "classification" else None,  # type: ignore[misc]
    )
    _CACHE[key] = data
    return data
