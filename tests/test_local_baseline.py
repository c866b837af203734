"""The local-only baseline (job setting local-baseline): each organization also trains an adapter
alone with the same budget, keeps it, and reports its held-out score next to the federated one.

Organization side: instructions built by hand as a coordinator sends them, handed to the real
``round_work.train`` / ``round_work.evaluate`` with the tiny model and a deployed agent's node
config (its silo file, its persistent state as a Flower RecordDict). Coordinator side: the report
and its table built from a history as the coordinator records it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import RecordDict
from rich.console import Console

from clients import round_work
from clients.evaluation import EVAL_METRICS
from clients.local_baseline import LOCAL_BASELINE_ROUND_STATE, LOCAL_BASELINE_STATE, LOCAL_EVAL_METRICS
from clients.node_config import ORG_NAME_KEY, POLICY_PATH_KEY, SILO_PATH_KEY, STATE_DIR_KEY
from clients.policy import KNOWN_METRICS, forget_cached_policies
from protos import codec
from protos.adapter import Adapter, adapter_layout, init_adapter
from protos.records import CONFIG_RECORD, METRICS_RECORD
from runtime import base_model
from server.cli.report_table import report_table
from server.job_config import JobConfig
from server.report import build_report

JOB = JobConfig(model="tiny-llama", job_id="bank-job", lora_r=4, local_steps=2, batch_size=4, max_length=64,
                eval_max_examples=6, learning_rate=0.05, seed=3)


# ---- the organization ------------------------------------------------------------------

@pytest.fixture(scope="module")
def silo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clients.silo.corpora import load_bbc_news

    path = tmp_path_factory.mktemp("silo") / "bank.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in load_bbc_news()[:40]))
    return path


@pytest.fixture
def node(silo: Path, tmp_path: Path) -> dict[str, Any]:
    """A deployed agent's node config, default policy."""
    return {SILO_PATH_KEY: str(silo), ORG_NAME_KEY: "bank", STATE_DIR_KEY: str(tmp_path)}


@pytest.fixture(autouse=True)
def _fresh_policies() -> Any:
    forget_cached_policies()
    yield
    forget_cached_policies()


def initial() -> Adapter:
    """The federation's round-1 global adapter, as the coordinator makes it."""
    return init_adapter(adapter_layout(base_model.model_config(JOB.model), JOB.lora), JOB.seed)


def instruction(server_round: int, global_adapter: Adapter, *, local_baseline: bool = True,
                **changes: Any) -> RecordDict:
    cfg = dataclasses.replace(JOB.round_config(server_round), local_baseline=local_baseline, **changes)
    content = codec.encode(global_adapter, kind=codec.Kind.Value("GLOBAL"), job_id=cfg.job_id,
                           server_round=server_round, fingerprint=base_model.fingerprint(cfg.model), lora=cfg.lora)
    content[CONFIG_RECORD] = cfg.to_record()
    return content


def trained_global(shift: float) -> Adapter:
    """Some later round's global adapter: B no longer zero."""
    return {name: value + np.float32(shift) for name, value in initial().items()}


def local_only(state: RecordDict) -> Adapter:
    return {name: array.numpy() for name, array in state.array_records[LOCAL_BASELINE_STATE].items()}


def evaluated(content: RecordDict, node: dict[str, Any], state: RecordDict) -> dict[str, float]:
    return dict(round_work.evaluate(content, node, state).metric_records[METRICS_RECORD])


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Adapter, Any]]:
    """(the adapter it starts from, its settings) of every training the round work runs."""
    calls: list[tuple[Adapter, Any]] = []
    real = round_work.train_adapter

    def spy(resident: Any, start: Adapter, examples: Any, settings: Any, **kwargs: Any) -> Any:
        calls.append(({k: np.array(v, copy=True) for k, v in start.items()}, settings))
        return real(resident, start, examples, settings, **kwargs)

    monkeypatch.setattr(round_work, "train_adapter", spy)
    return calls


def same(a: Adapter, b: Adapter) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- off: nothing changes ----------------------------------------------------------------

def test_without_local_baseline_nothing_is_trained_kept_or_reported(node: dict[str, Any],
                                                                    starts: list[Any]) -> None:
    state = RecordDict()
    header, _ = codec.decode(round_work.train(instruction(1, initial(), local_baseline=False), node, state))
    assert len(starts) == 1, "only the federated training"
    assert LOCAL_BASELINE_STATE not in state and LOCAL_BASELINE_ROUND_STATE not in state
    assert not any(key.startswith("local_") for key in header.metrics)
    metrics = evaluated(instruction(1, trained_global(0.01), local_baseline=False), node, state)
    assert not any(key.startswith("local_") for key in metrics)


# ---- on: trained, kept, never sent ---------------------------------------------------------

def test_the_local_only_adapter_is_kept_in_state_and_never_sent(node: dict[str, Any], starts: list[Any]) -> None:
    state = RecordDict()
    off = codec.decode(round_work.train(instruction(1, initial(), local_baseline=False), node, RecordDict()))[0]
    reply = round_work.train(instruction(1, initial()), node, state)
    header, update = codec.decode(reply)
    kept = local_only(state)

    assert set(kept) == set(initial()) and not same(kept, update), "its own adapter, not the federated one"
    assert not same(kept, initial()), "trained"
    sent = [array.numpy() for record in reply.array_records.values() for array in record.values()]
    assert not any(value.shape == k.shape and np.array_equal(value, k) for value in sent for k in kept.values())
    assert set(header.metrics) == set(off.metrics), "the train reply is what it is without the setting"
    # the same budget: steps, batch size, learning rate, factors; its own batch order
    (federated_start, federated), (local_start, local) = starts[-2:]
    assert dataclasses.replace(local, seed=federated.seed) == federated and local.seed != federated.seed
    assert same(local_start, initial()), "round 1: where the federation starts"


def test_ffa_lora_trains_the_same_factors_locally(node: dict[str, Any]) -> None:
    state = RecordDict()
    round_work.train(instruction(1, initial(), train_factors="lora_B"), node, state)
    kept = local_only(state)
    for name, value in initial().items():
        frozen = ".lora_A." in name
        assert np.array_equal(kept[name], value) == frozen, name


def test_evaluate_scores_the_local_only_adapter_on_the_same_examples(node: dict[str, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    state = RecordDict()
    round_work.train(instruction(1, initial()), node, state)
    scored: list[list[Any]] = []
    real = round_work.evaluate_examples

    def spy(resident: Any, examples: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        scored.append(list(examples))
        return real(resident, examples, *args, **kwargs)

    monkeypatch.setattr(round_work, "evaluate_examples", spy)
    metrics = evaluated(instruction(1, trained_global(0.02)), node, state)

    assert len(scored) == 2 and scored[0] == scored[1] and len(scored[0]) == metrics["num_examples"]
    reported = {name for name in EVAL_METRICS if name in metrics and name != "num_examples"}
    assert {"loss", "perplexity", "accuracy"} <= reported
    assert {key for key in metrics if key.startswith("local_")} == {f"local_{name}" for name in reported}
    assert metrics["local_loss"] != metrics["loss"], "another adapter"


def test_round_zero_scores_the_base_model_with_no_local_only_metric(node: dict[str, Any]) -> None:
    metrics = evaluated(instruction(0, initial()), node, RecordDict())
    assert "accuracy" in metrics and not any(key.startswith("local_") for key in metrics)


def test_the_local_only_adapter_continues_from_its_own_state_not_the_new_global(
        node: dict[str, Any], starts: list[Any]) -> None:
    state = RecordDict()
    round_work.train(instruction(1, initial()), node, state)
    after_round_1 = local_only(state)
    new_global = trained_global(0.03)
    round_work.train(instruction(2, new_global), node, state)
    (federated_start, _), (local_start, _) = starts[-2:]
    assert same(federated_start, new_global)
    assert same(local_start, after_round_1)
    after_round_2 = local_only(state)
    assert not same(after_round_2, after_round_1)

    # a retried (or resumed) round 2: the federated adapter trains again from the global, the local-only one does not
    round_work.train(instruction(2, new_global), node, state)
    assert len(starts) == 5 and same(local_only(state), after_round_2)


def test_an_organization_first_trained_after_round_one_starts_where_the_federation_started(
        node: dict[str, Any], starts: list[Any]) -> None:
    round_work.train(instruction(3, trained_global(0.03)), node, RecordDict())
    assert same(starts[-1][0], initial())


# ---- the organization's policy ---------------------------------------------------------------

def test_the_local_only_metric_names_follow_the_evaluation_metrics() -> None:
    assert LOCAL_EVAL_METRICS == tuple(f"local_{name}" for name in EVAL_METRICS if name != "num_examples")
    assert set(LOCAL_EVAL_METRICS) <= set(KNOWN_METRICS), "they may leave by default"


def test_an_organizations_allowed_metrics_can_drop_the_local_only_metrics(node: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    state = RecordDict()
    round_work.train(instruction(1, initial()), node, state)
    (tmp_path / "policy.yaml").write_text("allowed_metrics: [num_examples, accuracy, loss]\n")
    assert set(evaluated(instruction(1, initial()), {**node, POLICY_PATH_KEY: str(tmp_path / "policy.yaml")},
                         state)) == {"num_examples", "accuracy", "loss"}
    (tmp_path / "only-local.yaml").write_text("allowed_metrics: [num_examples, local_accuracy]\n")
    assert set(evaluated(instruction(1, initial()), {**node, POLICY_PATH_KEY: str(tmp_path / "only-local.yaml")},
                         state)) == {"num_examples", "local_accuracy"}


# ---- the report ------------------------------------------------------------------------------

def _history(local: bool) -> list[dict[str, Any]]:
    def org(n: int, acc: float, ppl: float, local_acc: float | None = None) -> dict[str, float]:
        metrics = {"num_examples": float(n), "accuracy": acc, "loss": float(np.log(ppl)), "perplexity": ppl}
        if local_acc is not None:
            metrics |= {"local_accuracy": local_acc, "local_loss": float(np.log(2 * ppl)),
                        "local_perplexity": 2 * ppl}
        return metrics

    def overall(per_org: dict[str, dict[str, float]]) -> dict[str, float]:
        from server.job import overall_metrics

        return overall_metrics(per_org)

    base = {"org-a": org(10, 0.2, 9.0), "org-b": org(30, 0.1, 12.0)}
    last = {"org-a": org(10, 0.9, 1.5, 0.6 if local else None), "org-b": org(30, 0.8, 1.2, 0.4 if local else None)}
    return [{"round": 0, "eval": base, "eval_overall": overall(base)},
            {"round": 2, "eval": last, "eval_overall": overall(last)}]


def _printed(report: dict[str, Any]) -> str:
    console = Console(width=200, record=True)
    console.print(report_table(report))
    return console.export_text()


META = {"job_id": "j", "strategy": "fedavg"}


def test_the_report_has_base_local_only_and_specialist_per_organization_and_overall() -> None:
    report = build_report(_history(local=True), META)
    a = report["organizations"]["org-a"]
    assert set(a) == {"base", "local", "specialist"}
    assert a["base"]["accuracy"] == 0.2 and a["specialist"]["accuracy"] == 0.9
    assert a["local"] == {"num_examples": 10.0, "accuracy": 0.6, "loss": pytest.approx(np.log(3.0)),
                          "perplexity": 3.0}
    overall = report["overall"]["local"]
    assert overall["num_examples"] == 40 and overall["accuracy"] == pytest.approx((10 * 0.6 + 30 * 0.4) / 40)
    assert overall["perplexity"] == pytest.approx(np.exp((10 * np.log(3.0) + 30 * np.log(2.4)) / 40))

    printed = _printed(report)
    for column in ("base acc", "local acc", "federated acc", "Δ vs local", "base ppl", "local ppl", "federated ppl"):
        assert column in printed
    assert "+0.300" in printed and "+0.400" in printed, "federated − local-only accuracy of org-a and org-b"


def test_without_local_only_metrics_the_report_and_table_are_as_before() -> None:
    report = build_report(_history(local=False), META)
    assert "local" not in report["overall"] and all("local" not in o for o in report["organizations"].values())
    printed = _printed(report)
    assert "local" not in printed and "specialist acc" in printed and "Δ acc" in printed


def test_without_accuracy_the_gain_over_local_only_is_the_perplexity_ratio() -> None:
    history = _history(local=True)
    for entry in history:
        for metrics in entry["eval"].values():
            metrics.pop("accuracy"), metrics.pop("local_accuracy", None)
        entry["eval_overall"].pop("accuracy")
    printed = _printed(build_report(history, META))
    assert "acc" not in printed and "ppl vs local" in printed and "×0.50" in printed
