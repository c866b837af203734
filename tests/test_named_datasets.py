"""An agent offers named datasets; each job names the one it trains on (issue 13, the organization's side).

`silotune agent start --data legal=a.jsonl --data tax=b.jsonl` offers two silo files under two names
(node config ``silo-paths``); a job's ``dataset`` picks one ("" for the agent's only one); the
organization's policy (rule ``datasets``) says which ones jobs may use, and a job naming any other
— or one the agent does not offer — is refused before anything is loaded. Fast: the functions
themselves, real files, no Flower process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.app import RecordDict
from flwr.common.config import parse_config_args

from clients import local_data, round_work
from clients.agent import Agent, parse_data
from clients.local_data import AmbiguousDataset, UnknownDataset, choose_silo_path, load_local_silo
from clients.node_config import (ORG_NAME_KEY, POLICY_PATH_KEY, SILO_PATH_KEY, SILO_PATHS_KEY, DatasetError,
                                 offered_silos, parse_silo_paths, render_silo_paths)
from clients.policy import (OrganizationPolicy, PolicyError, PolicyViolation, Request, forget_cached_policies,
                            policy_for)
from clients.silo import SiloFileNotFound
from protos import codec
from protos.adapter import adapter_layout, init_adapter
from protos.records import CONFIG_RECORD
from runtime import base_model
from runtime.flower_processes import render_flwr_config
from server.job_config import JobConfig
from simulations.cli.main import build_parser

JOB = JobConfig(model="tiny-llama", job_id="claims", lora_r=4, local_steps=1, batch_size=2, max_length=64,
                eval_max_examples=4, seed=1)


@pytest.fixture(autouse=True)
def _fresh_policies() -> Any:
    forget_cached_policies()
    yield
    forget_cached_policies()


def qa_silo(path: Path, topic: str, rows: int = 8) -> Path:
    """An instruction silo whose every prompt names its topic."""
    path.write_text("".join(json.dumps({"instruction": f"{topic} question {i}?", "response": f"{topic} answer {i}"})
                            + "\n" for i in range(rows)))
    return path


@pytest.fixture
def two_silos(tmp_path: Path) -> dict[str, Path]:
    return {"legal": qa_silo(tmp_path / "legal.jsonl", "legal"), "tax": qa_silo(tmp_path / "tax.jsonl", "tax", 12)}


def node_with(datasets: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {SILO_PATHS_KEY: render_silo_paths(datasets), ORG_NAME_KEY: "firm", **extra}


def round_config(dataset: str = "", **changes: Any) -> Any:
    return dataclasses.replace(JOB.round_config(1), dataset=dataset, **changes)


def topics(silo: Any) -> set[str]:
    return {example.prompt.split()[0] for example in silo.examples}


# ---- `agent start --data` ----------------------------------------------------------------

def test_data_takes_named_files_and_bare_files_named_by_their_stem(tmp_path: Path) -> None:
    parsed = parse_data(["legal=a.jsonl", f"tax={tmp_path}/b=c.csv", f"{tmp_path}/claims.v2.parquet"])
    assert parsed == {"legal": Path("a.jsonl").resolve(), "tax": tmp_path / "b=c.csv",
                      "claims.v2": tmp_path / "claims.v2.parquet"}
    assert list(parsed) == ["legal", "tax", "claims.v2"]  # in the order given
    assert parse_data([f"{tmp_path}/a=b.jsonl"]) == {"a=b": tmp_path / "a=b.jsonl"}  # a path before '=': a file
    assert parse_data(["my silo.jsonl"]) == {"my silo": Path("my silo.jsonl").resolve()}  # alone: any stem


def test_the_start_command_repeats_data() -> None:
    args = build_parser().parse_args(["agent", "start", "--insecure", "--coordinator", "127.0.0.1:1",
                                      "--data", "legal=a.jsonl", "--data", "b.jsonl"])
    assert args.data == ["legal=a.jsonl", "b.jsonl"]


@pytest.mark.parametrize("values,error", [
    (["legal=a.jsonl", "legal=b.jsonl"], "'legal' is given twice"),
    (["a.jsonl", "x/a.jsonl"], "'a' is given twice"),                  # two stems alike: name them
    (["le gal=a.jsonl"], "dataset name 'le gal'"),
    (["legal;tax=a.jsonl"], "dataset name 'legal;tax'"),
    (["=a.jsonl"], "dataset name ''"),
    (["legal="], "no file"),
    (["my silo.jsonl", "tax=b.jsonl"], "name it, --data NAME=FILE"),   # among several a stem must be a name
    ([], "at least one silo file"),
])
def test_bad_data_values_are_named_errors(values: list[str], error: str) -> None:
    with pytest.raises(DatasetError, match=error):
        parse_data(values)


def test_the_agent_writes_silo_path_for_one_bare_file_and_silo_paths_otherwise(tmp_path: Path) -> None:
    one = Agent([str(tmp_path / "bank.jsonl")], "127.0.0.1:1", resident=False)
    assert one.silo_config == {SILO_PATH_KEY: str(tmp_path / "bank.jsonl")} and one.name == "bank"
    named = Agent(["legal=/d/a.jsonl", "tax=/d/b.csv"], "127.0.0.1:1", resident=False)
    assert named.silo_config == {SILO_PATHS_KEY: "legal=/d/a.jsonl;tax=/d/b.csv"}
    assert named.name == "a"  # no --name: the first file's stem, as with one file
    assert Agent({"legal": "/d/a.jsonl"}, "127.0.0.1:1", resident=False).silo_config == {
        SILO_PATHS_KEY: "legal=/d/a.jsonl"}


def test_the_agent_refuses_a_path_the_node_config_cannot_carry(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="rename or link the file"):
        Agent(["legal=/d/a;b.jsonl", "tax=/d/b.csv"], "127.0.0.1:1", resident=False)


def test_a_policy_naming_a_dataset_the_agent_does_not_offer_stops_the_agent(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"datasets": ["legal", "claims"]}))
    with pytest.raises(PolicyError, match="claims"):
        Agent(["legal=/d/a.jsonl", "tax=/d/b.csv"], "127.0.0.1:1", resident=False, policy=policy)
    policy.write_text(yaml.safe_dump({"datasets": ["not a name"]}))
    with pytest.raises(PolicyError, match="datasets"):
        Agent(["legal=/d/a.jsonl"], "127.0.0.1:1", resident=False, policy=policy)


def test_start_validates_every_file_before_anything_starts(two_silos: dict[str, Path], tmp_path: Path) -> None:
    agent = Agent([f"legal={two_silos['legal']}", f"tax={tmp_path / 'missing.jsonl'}"], "127.0.0.1:1",
                  resident=False, state_dir=tmp_path / "state")
    with pytest.raises(SiloFileNotFound):
        agent.start()
    assert agent.supernode is None and not (tmp_path / "state").exists()


# ---- the node config -------------------------------------------------------------------------

def test_silo_paths_survive_flowers_node_config(tmp_path: Path) -> None:
    datasets = {"legal": "/data/it's a=b/legal.jsonl", "tax.2024": "/data/tax.csv"}
    rendered = render_flwr_config({SILO_PATHS_KEY: render_silo_paths(datasets), ORG_NAME_KEY: "firm"})
    node_config = parse_config_args([rendered])  # what the SuperNode hands each ClientApp
    assert offered_silos(node_config) == datasets
    assert parse_silo_paths(render_silo_paths(datasets)) == datasets
    assert offered_silos({SILO_PATH_KEY: "/data/bank.jsonl"}) == {"bank": "/data/bank.jsonl"}  # one, as before
    assert offered_silos({"partition-id": 0}) == {}
    with pytest.raises(DatasetError, match="both"):
        offered_silos({SILO_PATH_KEY: "/a.jsonl", SILO_PATHS_KEY: "a=/a.jsonl"})
    with pytest.raises(DatasetError, match="named twice"):
        parse_silo_paths("a=/x.jsonl;a=/y.jsonl")


# ---- the job's dataset picks the file ----------------------------------------------------------

def test_each_job_loads_the_dataset_it_names(two_silos: dict[str, Path]) -> None:
    node = node_with(two_silos)
    assert topics(load_local_silo(node, round_config("legal"), None)) == {"legal"}
    assert topics(load_local_silo(node, round_config("tax"), None)) == {"tax"}


def test_a_job_without_a_dataset_gets_the_agents_only_one(two_silos: dict[str, Path]) -> None:
    assert topics(load_local_silo(node_with({"tax": two_silos["tax"]}), round_config(""), None)) == {"tax"}
    # a node config as before named datasets: one silo file, named by its stem
    legacy = {SILO_PATH_KEY: str(two_silos["legal"])}
    assert topics(load_local_silo(legacy, round_config(""), None)) == {"legal"}
    assert topics(load_local_silo(legacy, round_config("legal"), None)) == {"legal"}


def test_an_unknown_or_missing_dataset_name_is_a_named_error_listing_the_offer(
        two_silos: dict[str, Path]) -> None:
    node = node_with(two_silos)
    with pytest.raises(UnknownDataset, match="'claims'; this agent offers legal, tax"):
        choose_silo_path(node, "claims")
    with pytest.raises(AmbiguousDataset, match="offers 2: legal, tax"):
        load_local_silo(node, round_config(""), None)
    with pytest.raises(UnknownDataset, match="offers legal"):
        load_local_silo({SILO_PATH_KEY: str(two_silos["legal"])}, round_config("tax"), None)


def test_the_data_cache_keeps_two_datasets_of_one_agent_apart(two_silos: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_data, "_CACHE", {})
    tokenizer = base_model.load_tokenizer("tiny-llama")
    node = node_with(two_silos)
    legal = local_data.local_data(node, round_config("legal"), None, tokenizer)
    tax = local_data.local_data(node, round_config("tax"), None, tokenizer)
    assert topics(legal.silo) == {"legal"} and topics(tax.silo) == {"tax"}
    assert len(tax.silo) == 12 and len(legal.silo) == 8
    assert local_data.local_data(node, round_config("legal"), None, tokenizer) is legal  # still a cache


# ---- the organization's policy decides, before anything is loaded -------------------------------

def request(dataset: str) -> Request:
    return Request(kind="train", job_id="claims", server_round=1, model="tiny-llama", fingerprint="blake2b:0",
                   rank=4, batch_size=2, local_steps=1, eval_examples=4, dp_clip=0.0, dp_noise=0.0,
                   secure_session=None, dataset=dataset)


def test_the_policy_knows_what_its_node_offers(tmp_path: Path) -> None:
    node = {SILO_PATHS_KEY: "legal=/d/a.jsonl;tax=/d/b.jsonl"}
    policy = policy_for(node)
    assert policy == OrganizationPolicy() and policy.offered_datasets == ("legal", "tax")  # a fact, not a rule
    policy.check(request("tax"))
    for dataset, why in [("claims", "asks for dataset 'claims'; this agent offers legal, tax"),
                         ("", "names no dataset and this agent offers 2")]:
        with pytest.raises(PolicyViolation) as refused:
            policy.check(request(dataset))
        assert refused.value.rule == "datasets" and why in refused.value.detail
        assert str(refused.value) == "policy_violation: datasets"  # the offer stays here
    file = tmp_path / "policy.yaml"
    file.write_text(yaml.safe_dump({"datasets": ["legal"]}))
    restricted = policy_for({**node, POLICY_PATH_KEY: str(file)})
    assert restricted is policy_for({**node, POLICY_PATH_KEY: str(file)})  # read (and bound) once per process
    restricted.check(request("legal"))
    with pytest.raises(PolicyViolation, match="datasets"):
        restricted.check(request("tax"))
    assert policy_for({SILO_PATH_KEY: "/d/bank.jsonl"}).offered_datasets == ("bank",)
    assert policy_for({"partition-id": 0}).offered_datasets is None  # a virtual organization: no offer


def instruction(dataset: str) -> RecordDict:
    """A train instruction as a coordinator sends it, for the job's `dataset`."""
    cfg = round_config(dataset)
    start = init_adapter(adapter_layout(base_model.model_config(cfg.model), cfg.lora), seed=0)
    content = codec.encode(start, kind=codec.Kind.Value("GLOBAL"), job_id=cfg.job_id, server_round=1,
                           fingerprint="blake2b:" + "0" * 32, lora=cfg.lora)
    content[CONFIG_RECORD] = cfg.to_record()
    return content


class PastThePolicy(Exception):
    """The round work went on to load something: the policy let the instruction through."""


@pytest.mark.parametrize("dataset,allowed", [
    ("tax", ["legal"]),     # offered, but the organization does not let jobs use it
    ("claims", None),       # not offered here
    ("", None),             # several offered: the agent does not guess
])
def test_a_refused_dataset_is_refused_before_the_model_or_any_silo_is_loaded(
        dataset: str, allowed: list[str] | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def nothing_loads(*args: Any, **kwargs: Any) -> Any:
        raise PastThePolicy

    monkeypatch.setattr(round_work, "get_resident", nothing_loads)
    monkeypatch.setattr(local_data, "load_silo", nothing_loads)
    # files that do not exist: opening either would fail with another error than the refusal
    node = node_with({"legal": tmp_path / "legal.jsonl", "tax": tmp_path / "tax.jsonl"})
    if allowed is not None:
        (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"datasets": allowed}))
        node[POLICY_PATH_KEY] = str(tmp_path / "policy.yaml")
    with pytest.raises(PolicyViolation) as refused:
        round_work.train(instruction(dataset), node, RecordDict())
    assert refused.value.rule == "datasets"
    # the positive control: the dataset the policy allows goes on to the loading
    with pytest.raises(PastThePolicy):
        round_work.train(instruction("legal"), node, RecordDict())

