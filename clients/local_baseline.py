"""The local-only baseline: what an organization would reach by training alone.

With the job setting ``local-baseline`` (a round setting: ``cfg.local_baseline``)
each organization trains, besides its part of the federated adapter, a
local-only adapter with the same local budget each round it trains (local
steps, batch size, learning rate, the factors the strategy trains). It starts
from the initial adapter the federation started from and continues from its
own last state round after round, never from the new global. It never leaves
the organization: it lives in this node's persistent state
(``LOCAL_BASELINE_STATE``, like the locally kept factors). It is scored on the
same held-out examples as the federated adapter, and only those scores leave,
as ``local_<metric>`` (``LOCAL_EVAL_METRICS``), under the same policy as every
other metric. The report (server/report.py) puts them next to the base model
and the specialist: the gain of federating over training alone.

Decisions:

* Its own batch order (seed derived from the organization's name with
  ``/local-only`` appended). With the federated seed, round 1 would repeat the
  federated training step for step and the first round's comparison would say nothing.
* No FedProx term (``proximal_mu`` 0): μ ties local training to the global
  adapter it started from, and a local-only adapter has no global. Anchoring it
  to its own start of the round would only slow it down and inflate the gain.
* An organization that first trains after round 1 (not sampled before) starts
  from the federation's initial adapter, rebuilt from the job seed as the
  coordinator builds it (``protos.adapter.init_adapter``), at its own rank.
* One training per round: a retried or resumed round whose local-only round
  already ran does not train it again (the federated adapter restarts from the
  same global on a retry; the local-only one would otherwise get twice the budget).
* No noise under local DP: the local-only adapter is never sent.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from clients.evaluation import EVAL_METRICS
from clients.trainer import TrainSettings
from protos.adapter import Adapter, init_adapter, layout_for_rank
from protos.records import LOCAL_METRIC_PREFIX
from protos.round_config import RoundConfig
from strategies.lora_rank import reduce_adapter

#: the local-only adapter in this node's state, and which job and round it was last trained in
LOCAL_BASELINE_STATE = "silotune.local-baseline"
LOCAL_BASELINE_ROUND_STATE = "silotune.local-baseline.round"

#: the local-only adapter's evaluation metrics; no count of its own: same examples as ``num_examples``
LOCAL_EVAL_METRICS = tuple(LOCAL_METRIC_PREFIX + name for name in EVAL_METRICS if name != "num_examples")


def local_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """An evaluation of the local-only adapter, as its reply metrics (``local_accuracy``, …)."""
    return {LOCAL_METRIC_PREFIX + name: value for name, value in metrics.items() if name != "num_examples"}


def stored(state: RecordDict, job_id: str, layout: Mapping[str, tuple[int, ...]]) -> Adapter | None:
    """This job's local-only adapter, or None: none yet, another job's, or another shape
    (the organization's rank changed): then it starts again from the initial adapter."""
    meta = state.config_records.get(LOCAL_BASELINE_ROUND_STATE)
    record = state.array_records.get(LOCAL_BASELINE_STATE)
    if meta is None or record is None or meta.get("job_id") != job_id:
        return None
    adapter = {name: array.numpy() for name, array in record.items()}
    if {name: tuple(value.shape) for name, value in adapter.items()} != dict(layout):
        return None
    return adapter


def trained_in(state: RecordDict, job_id: str, server_round: int) -> bool:
    meta = state.config_records.get(LOCAL_BASELINE_ROUND_STATE)
    return meta is not None and meta.get("job_id") == job_id and meta.get("server_round") == server_round


def keep(state: RecordDict, adapter: Adapter, job_id: str, server_round: int) -> None:
    state[LOCAL_BASELINE_STATE] = ArrayRecord(array_dict={name: Array(value) for name, value in adapter.items()})
    state[LOCAL_BASELINE_ROUND_STATE] = ConfigRecord({"job_id": job_id, "server_round": server_round})


def initial_adapter(cfg: RoundConfig, layout: Mapping[str, tuple[int, ...]], rank: int) -> Adapter:
    """The federation's round-1 global adapter at this organization's rank, rebuilt from
    the job seed (``layout``: this organization's, at ``rank``)."""
    initial = init_adapter(layout_for_rank(dict(layout), cfg.lora.rank), cfg.seed)
    return reduce_adapter(initial, rank, cfg.rank_reduction)


def train_settings(federated: TrainSettings, seed: int) -> TrainSettings:
    """The federated round's budget and factors; its own batch order, no proximal term."""
    return dataclasses.replace(federated, seed=seed, proximal_mu=0.0)
