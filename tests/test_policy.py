"""An organization's policy (clients/policy.py), enforced by the real round work.

Instructions are built by hand as a coordinator would send them (the codec's
GLOBAL message + a round config record + a deployed agent's node config) and
handed to ``round_work.train`` / ``round_work.evaluate`` with the tiny model.
That the silo file is never opened for a refused instruction is checked on the
file's access itself: a Python audit hook records every ``open`` of its path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import stat
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, RecordDict

from clients import local_data, round_work
from clients.node_config import ORG_NAME_KEY, POLICY_PATH_KEY, SILO_PATH_KEY, STATE_DIR_KEY
from clients.policy import (
    DATA_INDEPENDENT_METRICS,
    KNOWN_METRICS,
    SIMULATION_POLICY,
    OrganizationPolicy,
    PolicyError,
    PolicyViolation,
    forget_cached_policies,
    load_policy,
    policy_for,
    render_policy_table,
)
from clients.privacy import LEDGER_FILE, EpsilonLedger
from protos import codec
from protos.adapter import adapter_layout, init_adapter
from protos.records import CONFIG_RECORD, HEADER_RECORD, METRICS_RECORD, ORG_RECORD
from protos.secagg import MaskingClient, RingSpec, Session, wire
from runtime import base_model
from server.job_config import JobConfig
from strategies.accountant import RdpAccountant

ROOT = Path(__file__).resolve().parent.parent

#: a compliant instruction under the default policy; each case below breaks one rule
BASE = JobConfig(model="tiny-llama", job_id="bank-job", lora_r=4, local_steps=2, batch_size=4, max_length=64,
                 eval_max_examples=4, learning_rate=0.05)

#: settings that are no refusal rule (every other field is one)
NOT_RULES = {"dp_delta", "unnoised_metrics_under_dp"}


# ---- the silo file's access ------------------------------------------------------

_WATCHED: set[str] = set()
_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path in _WATCHED:
            _OPENED.append(path)


sys.addaudithook(_audit)  # cannot be removed: it does nothing unless a test watches a path


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """watch(path) → the list of opens of that file from now on. The data cache is emptied,
    so round work that got as far as the data would have to open the file."""
    monkeypatch.setattr(local_data, "_CACHE", {})

    def start(path: Path) -> list[str]:
        _OPENED.clear()
        _WATCHED.add(os.path.realpath(path))
        return _OPENED

    yield start
    _WATCHED.clear()
    _OPENED.clear()


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every base model the round work asks for."""
    asked: list[str] = []
    real = round_work.get_resident

    def spy(name: str, lora: Any) -> Any:
        asked.append(name)
        return real(name, lora)

    monkeypatch.setattr(round_work, "get_resident", spy)
    return asked


@pytest.fixture(autouse=True)
def _fresh_policies() -> Iterator[None]:
    forget_cached_policies()
    yield
    forget_cached_policies()


# ---- instructions and the organization -------------------------------------------

def write_silo(path: Path, rows: int) -> Path:
    from clients.silo.corpora import load_bbc_news

    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in load_bbc_news()[:rows]))
    return path


@pytest.fixture(scope="module")
def silo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_silo(tmp_path_factory.mktemp("silo") / "bank.jsonl", 40)


def instruction(server_round: int = 1, **changes: Any) -> RecordDict:
    """What a coordinator sends: the encoded global adapter and the round config
    (changed as a coordinator may change it, past its own config checks)."""
    cfg = dataclasses.replace(BASE.round_config(server_round), **changes)
    start = init_adapter(adapter_layout(base_model.model_config(cfg.model), cfg.lora), seed=0)
    start = {k: v + np.float32(0.01) for k, v in start.items()}
    content = codec.encode(start, kind=codec.Kind.Value("GLOBAL"), job_id=cfg.job_id, server_round=server_round,
                           fingerprint=base_model.fingerprint(cfg.model), lora=cfg.lora)
    content[CONFIG_RECORD] = cfg.to_record()
    return content


def secure_state(organizations: int) -> RecordDict:
    """This node's state after joining a secure-aggregation session of that many organizations
    (threshold: all of them)."""
    session = Session(session_id=os.urandom(16), participants=tuple(range(1, organizations + 1)),
                      threshold=organizations, ring=RingSpec.derive(organizations, 0.05, 10000), length=8)
    state = RecordDict()
    state[wire.STATE_RECORD] = ConfigRecord(MaskingClient(session, 1).export_state())
    return state


def secure_mask_stage(content: RecordDict) -> RecordDict:
    """The mask stage's instruction: the train instruction with the secure-aggregation record."""
    content[wire.SECAGG_RECORD] = wire.mask_instruction(b"s" * 16, {})
    return content


def organization(silo: Path, state_dir: Path, policy: dict | None) -> dict[str, Any]:
    """A deployed agent's node config (no partition-id), with its policy file if any."""
    node = {SILO_PATH_KEY: str(silo), ORG_NAME_KEY: "bank", STATE_DIR_KEY: str(state_dir)}
    if policy is not None:
        text = yaml.safe_dump(policy)
        path = state_dir / f"policy-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"  # one file per policy
        path.write_text(text)
        node[POLICY_PATH_KEY] = str(path)
    return node


# ---- every rule, refused by name, before the data ----------------------------------

CASES = [
    # rule, policy file (None: no file, the defaults), instruction kind, what the coordinator asks
    ("allowed_base_models", {"allowed_base_models": ["smollm2-135m"]}, "train", {}),
    ("allowed_job_ids", {"allowed_job_ids": ["consortium-*"]}, "evaluate", {}),
    ("datasets", {"datasets": ["claims"]}, "train", {}),  # the job's "" is the agent's only dataset, bank
    ("max_rounds_per_job", {"max_rounds_per_job": 2}, "train", {"server_round": 3}),
    ("max_rank", {"max_rank": 2}, "evaluate", {}),
    ("min_batch_size", None, "train", {"batch_size": 1}),
    ("min_local_steps", {"min_local_steps": 4}, "train", {}),
    ("min_eval_examples", None, "evaluate", {"eval_max_examples": 1}),
    ("require_secure_aggregation", {"require_secure_aggregation": True}, "train", {}),
    ("min_secure_session", None, "train", {"secure_session": 2}),
    ("require_local_dp", {"require_local_dp": True}, "train", {}),
    ("min_dp_noise", {"min_dp_noise": 1.0}, "train", {"dp_clip": 0.5, "dp_noise": 0.5}),
    ("max_epsilon_per_job", {"max_epsilon_per_job": 1.0}, "train", {"dp_clip": 0.5, "dp_noise": 0.5}),
    ("max_epsilon_total", {"max_epsilon_total": 1.0}, "train", {}),     # no local noise: no ε bound
    ("allowed_metrics", None, "evaluate", {"dp_clip": 0.5, "dp_noise": 2.0}),  # under local DP: nothing un-noised
]


def test_the_cases_cover_every_rule() -> None:
    rules = {f.name for f in fields(OrganizationPolicy)} - NOT_RULES
    assert sorted(case[0] for case in CASES) == sorted(rules)


@pytest.mark.parametrize("rule,policy,kind,asked", CASES, ids=[case[0] for case in CASES])
def test_a_violating_instruction_is_refused_by_name_before_the_silo_is_opened(
        rule: str, policy: dict | None, kind: str, asked: dict, silo: Path, tmp_path: Path, watch: Any,
        model_loads: list[str], caplog: pytest.LogCaptureFixture) -> None:
    asked = dict(asked)
    server_round = asked.pop("server_round", 1)
    session = asked.pop("secure_session", None)
    content = instruction(server_round, **asked)
    state = RecordDict()
    if session is not None:
        content, state = secure_mask_stage(content), secure_state(session)
    node = organization(silo, tmp_path, policy)
    opened = watch(silo)
    with caplog.at_level(logging.WARNING, logger="silotune.client"), pytest.raises(PolicyViolation) as refused:
        round_work.HANDLERS[kind](content, node, state)
    assert refused.value.rule == rule
    # what Flower puts in the error reply: the rule, nothing else
    assert str(refused.value) == f"policy_violation: {rule}"
    assert refused.value.detail and refused.value.detail not in str(refused.value)
    assert opened == [], "the silo file was opened for a refused instruction"
    assert model_loads == [], "the base model was loaded for a refused instruction"
    assert f"policy rule {rule}" in caplog.text  # the agent's own log names the rule (and the detail)
    assert refused.value.detail in caplog.text
    assert not (tmp_path / LEDGER_FILE).exists()  # nothing charged


def test_a_compliant_instruction_does_read_the_silo(silo: Path, tmp_path: Path, watch: Any,
                                                    model_loads: list[str]) -> None:
    """The positive control of the test above: the same watch sees a compliant round open the
    file; and every metric the round work sends is one the policy knows."""
    node = organization(silo, tmp_path, None)
    opened = watch(silo)
    header, _ = codec.decode(round_work.train(instruction(), node, RecordDict()))
    assert opened and model_loads == ["tiny-llama"]
    assert set(header.metrics) <= set(KNOWN_METRICS) and "train_loss" in header.metrics
    assert header.num_examples > 1
    metrics = round_work.evaluate(instruction(), node, RecordDict()).metric_records[METRICS_RECORD]
    assert set(metrics) <= set(KNOWN_METRICS) and {"num_examples", "loss", "accuracy"} <= set(metrics)


def test_a_secure_session_large_enough_passes_the_policy(silo: Path, tmp_path: Path) -> None:
    node = organization(silo, tmp_path, {"require_secure_aggregation": True})
    with pytest.raises(PolicyViolation, match="require_secure_aggregation"):
        round_work.train(instruction(), node, RecordDict())
    reply = round_work.train(secure_mask_stage(instruction()), node, secure_state(3))
    assert codec.decode(reply)[1]  # trained: secure_aggregation.py masks this before it leaves


def test_refusals_that_need_the_split_sizes_name_only_the_rule(tmp_path: Path, watch: Any) -> None:
    """A train split smaller than the batch floor, a held-out split smaller than the evaluation
    floor: refused after loading, before anything is computed; the reply does not say the sizes."""
    small = write_silo(tmp_path / "small.jsonl", 3)
    node = organization(small, tmp_path, {"min_batch_size": 4})
    with pytest.raises(PolicyViolation) as refused:
        round_work.train(instruction(), node, RecordDict())
    assert str(refused.value) == "policy_violation: min_batch_size" and "train split" in refused.value.detail
    node = organization(write_silo(tmp_path / "mid.jsonl", 40), tmp_path, {"min_eval_examples": 15})
    with pytest.raises(PolicyViolation) as refused:
        round_work.evaluate(instruction(eval_max_examples=30), node, RecordDict())
    assert str(refused.value) == "policy_violation: min_eval_examples" and "held-out" in refused.value.detail


def test_the_refusal_survives_ray_pickling() -> None:
    """The resident trainer sends exceptions through Ray (pickle): both fields come back."""
    back = pickle.loads(pickle.dumps(PolicyViolation("max_rank", "LoRA rank 16 > 8")))
    assert (back.rule, back.detail, str(back)) == ("max_rank", "LoRA rank 16 > 8", "policy_violation: max_rank")


# ---- local DP: only what DP protects leaves ------------------------------------------

def test_under_local_dp_the_reply_carries_no_unnoised_metric(silo: Path, tmp_path: Path) -> None:
    node = organization(silo, tmp_path, None)  # the defaults
    plain = round_work.train(instruction(), node, RecordDict())
    assert "train_loss" in codec.decode(plain)[0].metrics  # the control: without DP the loss is sent
    reply = round_work.train(instruction(dp_clip=0.5, dp_noise=1.0), node, RecordDict())
    # every record of the real reply: the header (its metrics and count), the organization's name, tensors
    assert len(reply.metric_records) == 0
    header, update = codec.decode(reply)
    assert set(header.metrics) <= DATA_INDEPENDENT_METRICS, set(header.metrics) - DATA_INDEPENDENT_METRICS
    assert {"train_loss", "train_loss_last", "train_tokens", "train_seconds"}.isdisjoint(header.metrics)
    assert (header.metrics["dp_clip"], header.metrics["dp_noise"]) == (0.5, 1.0)
    assert header.num_examples == 1  # the train split's size is not sent either
    assert set(reply.config_records) == {HEADER_RECORD, ORG_RECORD} and not reply.array_records
    assert set(reply.config_records[HEADER_RECORD]) == {codec.HEADER_KEY, codec.INLINE_KEY}  # a small adapter: inline
    assert set(reply.config_records[ORG_RECORD]) == {"name"}
    # and the update was charged to the agent's own ledger before it left
    charges = EpsilonLedger(tmp_path / LEDGER_FILE).charges()
    assert [(c["job_id"], c["round"], c["noise_multiplier"]) for c in charges] == [("bank-job", 1, 1.0)]
    # an evaluation would send nothing but un-noised metrics of the held-out data: refused
    with pytest.raises(PolicyViolation, match="allowed_metrics"):
        round_work.evaluate(instruction(dp_clip=0.5, dp_noise=1.0), node, RecordDict())


def test_allowed_metrics_filters_what_leaves(silo: Path, tmp_path: Path) -> None:
    node = organization(silo, tmp_path, {"allowed_metrics": ["train_steps", "num_examples", "accuracy"]})
    header, _ = codec.decode(round_work.train(instruction(), node, RecordDict()))
    assert set(header.metrics) == {"train_steps"}
    metrics = round_work.evaluate(instruction(), node, RecordDict()).metric_records[METRICS_RECORD]
    assert set(metrics) == {"num_examples", "accuracy"}
    node = organization(silo, tmp_path, {"allowed_metrics": ["loss"]})
    with pytest.raises(PolicyViolation, match="allowed_metrics"):  # a score without its count
        round_work.evaluate(instruction(), node, RecordDict())


# ---- the ε ledger --------------------------------------------------------------------

def _epsilon(steps: int, z: float = 2.0, delta: float = 1e-5) -> float:
    accountant = RdpAccountant()
    accountant.step(1.0, z, steps)
    return accountant.epsilon(delta)


def test_the_epsilon_ledger_survives_a_restart_and_refuses_the_round_past_the_cap(
        silo: Path, tmp_path: Path, watch: Any) -> None:
    cap = (_epsilon(2) + _epsilon(3)) / 2  # two locally noised updates fit, a third does not
    node = organization(silo, tmp_path, {"require_local_dp": True, "max_epsilon_total": cap})
    dp = {"dp_clip": 0.5, "dp_noise": 2.0}
    round_work.train(instruction(job_id="job-a", **dp), node, RecordDict())
    ledger = tmp_path / LEDGER_FILE
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    # a restart: a new process reads the same state dir
    code = ("import sys; from clients.privacy import EpsilonLedger; "
            f"print(EpsilonLedger(sys.argv[1]).spent('job-b', 1e-5)[1])")
    out = subprocess.run([sys.executable, "-c", code, str(ledger)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, check=True).stdout
    assert float(out) == pytest.approx(_epsilon(1), rel=1e-12)
    forget_cached_policies()  # and this process forgets its policy and ledger objects
    round_work.train(instruction(job_id="job-b", **dp), node, RecordDict())  # another job: the total counts
    assert EpsilonLedger(ledger).spent("job-c", 1e-5) == pytest.approx((0.0, _epsilon(2)))
    forget_cached_policies()
    opened = watch(silo)
    with pytest.raises(PolicyViolation) as refused:
        round_work.train(instruction(job_id="job-c", **dp), node, RecordDict())
    assert refused.value.rule == "max_epsilon_total" and opened == []
    assert [c["job_id"] for c in EpsilonLedger(ledger).charges()] == ["job-a", "job-b"]
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600


def test_a_charge_is_checked_again_under_the_lock(tmp_path: Path) -> None:
    """Two rounds may both pass the check before training; only one fits at charge time."""
    ledger = EpsilonLedger(tmp_path / LEDGER_FILE)
    policy = OrganizationPolicy(max_epsilon_total=(_epsilon(1) + _epsilon(2)) / 2)
    assert ledger.charge("a", 1, 2.0, 1e-5, check=policy.check_epsilon)[1] == pytest.approx(_epsilon(1))
    with pytest.raises(PolicyViolation, match="max_epsilon_total"):
        ledger.charge("b", 1, 2.0, 1e-5, check=policy.check_epsilon)
    assert len(ledger.charges()) == 1
    (tmp_path / LEDGER_FILE).write_text("{not json")
    from clients.privacy import LedgerError

    with pytest.raises(LedgerError, match="never reset silently"):
        ledger.charges()


# ---- the file ------------------------------------------------------------------------

@pytest.mark.parametrize("text,key", [
    ("min_batch_sise: 4\n", "min_batch_sise"),                     # unknown key
    ("min_batch_size: four\n", "min_batch_size"),                  # wrong type
    ("min_batch_size: 2.5\n", "min_batch_size"),
    ("require_local_dp: 'yes'\n", "require_local_dp"),
    ("allowed_job_ids: consortium-*\n", "allowed_job_ids"),         # a string, not a list
    ("min_secure_session: 1\n", "min_secure_session"),             # bad values
    ("max_epsilon_total: 0\n", "max_epsilon_total"),
    ("dp_delta: 1.5\n", "dp_delta"),
    ("allowed_metrics: [train_loss, secret_sauce]\n", "allowed_metrics"),
    ("allowed_base_models: ['blake2b:xyz']\n", "allowed_base_models"),
    ("require_local_dp: true\nrequire_secure_aggregation: true\n", "require_secure_aggregation"),
    ("- min_batch_size\n", "mapping"),
    ("min_batch_size: [\n", "YAML"),
])
def test_a_bad_policy_file_is_a_named_error(text: str, key: str, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=key):
        load_policy(path)


def test_which_policy_applies(tmp_path: Path) -> None:
    assert load_policy(_write(tmp_path / "empty.yaml", "")) == OrganizationPolicy()
    assert policy_for({"partition-id": 0, "num-partitions": 3}) is SIMULATION_POLICY
    assert policy_for({SILO_PATH_KEY: "/data/silo.jsonl"}) == OrganizationPolicy()
    assert OrganizationPolicy().min_secure_session == 3 and OrganizationPolicy().min_batch_size == 2
    path = _write(tmp_path / "p.yaml", "min_local_steps: 5\nallowed_job_ids: ['a-*']\n")
    node = {SILO_PATH_KEY: "/data/silo.jsonl", POLICY_PATH_KEY: str(path), "partition-id": 1}
    first = policy_for(node)  # a test may give a virtual organization a policy file
    assert first.min_local_steps == 5 and first.allowed_job_ids == ("a-*",)
    path.write_text("min_local_steps: 9\n")
    assert policy_for(node) is first  # read once per process
    forget_cached_policies()
    assert policy_for(node).min_local_steps == 9


def test_the_readme_lists_every_field_as_the_dataclass_says(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render_policy_table() in readme, "README's 'Organization policy' table is stale: paste render_policy_table()"
    example = readme.split("## Organization policy", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    assert load_policy(_write(tmp_path / "readme.yaml", example)).max_epsilon_total == 10.0  # the example is valid


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
