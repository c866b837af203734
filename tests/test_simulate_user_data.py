"""`silotune simulate --data`: the user's own data split among virtual organizations, and `--ray-address`.

Fast: the partitioners (clients/silo/partition.py) on a customer-support ticket
file that no built-in scenario uses, the virtual organization's hook
(clients/local_data.py) and the command's checks before Ray starts.
Slow: the command end to end on the tiny model, on a new local Ray and on an
existing two-node Ray cluster.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients import local_data
from clients.node_config import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
from clients.silo import Silo, SiloMissingColumn
from clients.silo import partition
from clients.silo.partition import PartitionError, is_silo_folder, parse_partitioner, partition_silos
from protos.job_settings import JobSettings
from protos.round_config import round_config, simulation_settings
from protos.task_spec import TaskSpec
from runtime.flower_processes import stop_process_tree
from simulations.cli.main import main

SILOTUNE = str(Path(sys.executable).with_name("silotune"))
LABELS = ("account", "billing", "bug")
REGIONS = ("apac", "emea", "latam", "na")
TINY = ["--set", "model=tiny-llama", "--set", "local-steps=1", "--set", "max-length=64",
        "--set", "eval-max-examples=4"]


def ticket_rows(count: int = 60) -> list[dict[str, str]]:
    """Support tickets: a unique id in each text, three labels, four regions (uneven on purpose)."""
    topics = {"account": "cannot log in after the password reset",
              "billing": "was charged twice for the March invoice",
              "bug": "the export button crashes the dashboard"}
    rows = []
    for i in range(count):
        label = LABELS[i % 3]
        rows.append({"text": f"ticket {i:03d}: {topics[label]}", "label": label,
                     "region": REGIONS[(i * 7 // 5) % 4]})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tickets(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "tickets.csv", ticket_rows())


@pytest.fixture(autouse=True)
def fresh_plans():
    """Each test reads its files anew (the split is cached per process, keyed by file and mtime)."""
    partition._file_plan.cache_clear()
    partition._folder_plan.cache_clear()
    yield


def ticket_ids(silo: Silo) -> list[str]:
    return [e.prompt.split("Text: ticket ")[1][:3] for e in silo.examples]


def organizations_of(how: str) -> int:
    return len(REGIONS) if how.startswith("by:") else 3


# ---- the partitioners ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["iid", "dirichlet:0.5", "by:region"])
def test_every_row_lands_in_exactly_one_organization(tickets: Path, how: str) -> None:
    silos = partition_silos(tickets, organizations_of(how), how, seed=0)
    ids = [ticket_id for silo in silos for ticket_id in ticket_ids(silo)]
    assert sorted(ids) == [f"{i:03d}" for i in range(60)]  # disjoint and covering
    assert all(len(silo) > 0 for silo in silos)


def test_iid_gives_equal_parts(tickets: Path) -> None:
    assert [len(s) for s in partition_silos(tickets, 7, "iid")] == [9, 9, 9, 9, 8, 8, 8]


def test_by_column_gives_one_organization_per_value_in_sorted_order(tickets: Path) -> None:
    silos = partition_silos(tickets, 4, "by:region")
    region_of = {f"{i:03d}": row["region"] for i, row in enumerate(ticket_rows())}
    assert [{region_of[t] for t in ticket_ids(silo)} for silo in silos] == [{r} for r in REGIONS]


@pytest.mark.parametrize("how", ["iid", "dirichlet:0.5"])
def test_same_seed_same_split_another_seed_another(tickets: Path, how: str) -> None:
    def split(seed: int) -> list[list[str]]:
        partition._file_plan.cache_clear()
        return [ticket_ids(s) for s in partition_silos(tickets, 3, how, seed=seed)]

    assert split(0) == split(0)
    assert split(0) != split(1)


def test_dirichlet_skews_labels_yet_every_organization_renders_the_same_prompt(tickets: Path) -> None:
    silos = partition_silos(tickets, 3, "dirichlet:0.1", seed=0)
    held = [{e.label for e in silo.examples} for silo in silos]
    assert any(h != set(LABELS) for h in held), "no organization lacks a label: the check would be vacuous"
    assert all(silo.labels == LABELS for silo in silos)
    headers = {e.prompt.split("Text:")[0] for silo in silos for e in silo.examples}
    assert headers == {"Classify the text into one of these categories: account, billing, bug.\n\n"}


def test_the_jobs_own_labels_win_over_the_files(tickets: Path) -> None:
    spec = TaskSpec(kind="classification", labels=("bug", "billing", "account", "praise"))
    silos = partition_silos(tickets, 3, "iid", spec=spec)
    assert all(silo.labels == spec.labels for silo in silos)


def test_integer_labels_count_once_whatever_their_type(tmp_path: Path) -> None:
    # 1 and 1.0 (pandas' int-with-missing-values) are one label, as build.py normalises them
    rows = [{"text": f"ticket {i:03d}: priority", "label": float(i % 2) if i % 4 < 2 else i % 2} for i in range(20)]
    silos = partition_silos(write_jsonl(tmp_path / "p.jsonl", rows), 2, "dirichlet:1.0")
    assert all(silo.labels == ("0", "1") for silo in silos)


def test_a_folder_gives_organization_i_its_ith_file(tmp_path: Path) -> None:
    rows = ticket_rows(30)
    folder = tmp_path / "orgs"
    folder.mkdir()
    write_jsonl(folder / "a-clinic.jsonl", [r for r in rows if r["label"] != "bug"])
    write_csv(folder / "b-bank.csv", [r for r in rows if r["label"] == "bug"])
    write_jsonl(folder / "c-shop.jsonl", rows[:5])
    (folder / "README.txt").write_text("not a silo")
    (folder / ".hidden.jsonl").write_text("{}")
    assert is_silo_folder(folder)
    silos = partition_silos(folder, 3, "dirichlet:0.5")  # a folder is split by file: the partitioner is unused
    assert [Path(s.source).name for s in silos] == ["a-clinic.jsonl", "b-bank.csv", "c-shop.jsonl"]
    assert [len(s) for s in silos] == [20, 10, 5]
    assert all(silo.labels == LABELS for silo in silos)  # the bank holds only bugs but sees every category
    with pytest.raises(PartitionError, match=r"holds 3 silo files .* 4 organizations; run with --organizations 3"):
        partition_silos(folder, 4, "iid")


def test_a_datasets_folder_is_one_silo_not_a_folder_of_silos(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    assert not is_silo_folder(folder)
    assert not is_silo_folder(write_csv(tmp_path / "t.csv", ticket_rows(3)))


# ---- clear errors ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "random", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1",
                                  "dirichlet:abc", "dirichlet:inf", "by", "by:", "iid:3"])
def test_a_bad_partitioner_string_is_refused(text: str) -> None:
    with pytest.raises(PartitionError, match=r"expected one of iid, dirichlet:ALPHA, by:COLUMN|ALPHA must be"):
        parse_partitioner(text)


def test_by_column_count_mismatch_names_both_numbers(tickets: Path) -> None:
    with pytest.raises(PartitionError, match=r"4 values \('apac', 'emea', 'latam', 'na'\) but the simulation "
                                             r"has 3 organizations"):
        partition_silos(tickets, 3, "by:region")


def test_by_unknown_column_lists_the_columns(tickets: Path) -> None:
    with pytest.raises(PartitionError, match=r"no column 'customer'; columns: 'text', 'label', 'region'"):
        partition_silos(tickets, 3, "by:customer")


def test_by_column_with_a_missing_value_names_the_row(tmp_path: Path) -> None:
    rows = ticket_rows(6)
    rows[4]["region"] = " "
    with pytest.raises(PartitionError, match=r"1 row\(s\) have no .* value in 'region' \(rows 5\)"):
        partition_silos(write_csv(tmp_path / "t.csv", rows), 4, "by:region")


def test_an_organization_without_rows_is_an_error(tickets: Path) -> None:
    with pytest.raises(PartitionError, match=r"'iid' gives organization org-60 \(of 61\) no rows"):
        partition_silos(tickets, 61, "iid")
    with pytest.raises(PartitionError, match=r"'dirichlet:0.01' left organization org-\d+ \(of 40\) without rows"):
        partition_silos(tickets, 40, "dirichlet:0.01")


def test_dirichlet_needs_a_label_column(tmp_path: Path) -> None:
    faq = write_jsonl(tmp_path / "faq.jsonl", [{"instruction": f"question {i}?", "response": f"answer {i}"}
                                               for i in range(12)])
    with pytest.raises(PartitionError, match="dirichlet needs a label column"):
        partition_silos(faq, 3, "dirichlet:0.5")
    assert [len(s) for s in partition_silos(faq, 3, "iid")] == [4, 4, 4]


def test_a_file_with_the_wrong_columns_is_the_silo_error(tmp_path: Path) -> None:
    bad = write_csv(tmp_path / "bad.csv", [{"body": "hello", "category": "x"}])
    with pytest.raises(SiloMissingColumn):
        partition_silos(bad, 1, "iid")


# ---- the virtual organization's hook and the command's checks -----------------------------


def test_a_virtual_organization_loads_its_part_of_sim_data(tickets: Path) -> None:
    settings = JobSettings(sim_data=str(tickets), sim_partitioner="by:region")
    expected = partition_silos(tickets, 4, "by:region")
    for org in range(4):
        silo = local_data.load_local_silo({PARTITION_ID_KEY: org, NUM_PARTITIONS_KEY: 4},
                                          round_config(settings, 1), simulation_settings(settings))
        assert silo.examples == expected[org].examples and silo.labels == LABELS


def test_simulate_refuses_a_bad_file_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_csv(tmp_path / "bad.csv", [{"body": "hello", "category": "x"}])
    started = time.perf_counter()
    assert main(["simulate", "--data", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    assert "SiloMissingColumn" in capsys.readouterr().err
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "run").exists()


def test_simulate_refuses_a_partitioner_that_does_not_fit(tickets: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--data", str(tickets), "--partitioner", "by:region", "--organizations", "3",
                 "--run-dir", str(tmp_path / "run")]) == 2
    assert "4 values" in capsys.readouterr().err
    assert main(["simulate", "--partitioner", "iid", "--run-dir", str(tmp_path / "run")]) == 2
    assert "--partitioner splits your own data" in capsys.readouterr().err


# ---- end to end (slow) -----------------------------------------------------------------------


def simulate(cwd: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`silotune simulate` on ./tickets.csv (a relative path: Ray's workers run elsewhere), to the end."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([SILOTUNE, "simulate", "--data", "tickets.csv", "--partitioner", "dirichlet:0.5",
                             "--organizations", "3", "--rounds", "1", "--run-dir", "run", *TINY, *extra],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            stop_process_tree(proc.pid)
    assert proc.returncode == 0, output[-4000:]
    return proc, output


def assert_three_organizations_report(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["organizations"]) == ["org-0", "org-1", "org-2"]
    for metrics in report["organizations"].values():
        assert metrics["specialist"]["num_examples"] >= 1
        assert "accuracy" in metrics["specialist"] and "accuracy" in metrics["base"]


@pytest.mark.slow
def test_simulate_on_your_own_file(tmp_path: Path) -> None:
    write_csv(tmp_path / "tickets.csv", ticket_rows())
    _, output = simulate(tmp_path)
    assert_three_organizations_report(tmp_path / "run")
    assert "your data:" in output and "split dirichlet:0.5" in output
    assert "DEPRECATED" not in output


@pytest.mark.slow
def test_simulate_on_an_existing_two_node_ray_cluster(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    # conftest.py keeps every Ray a test starts on 127.0.0.1; the simulation's driver inherits that
    # setting, so it sees itself at the address the cluster's nodes were started with.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        assert cluster.address.startswith("127.0.0.1:")
        write_csv(tmp_path / "tickets.csv", ticket_rows())
        proc, output = simulate(tmp_path, "--ray-address", cluster.address)
        assert_three_organizations_report(tmp_path / "run")

        # The run was a driver of this cluster (it did not start a Ray of its own) ...
        jobs = [job["JobID"] for job in cluster.global_state.job_table() if job["DriverPid"] == proc.pid]
        assert len(jobs) == 1, cluster.global_state.job_table()
        # ... and its virtual organizations ran on both nodes: one 1-CPU actor fits each node.
        actors = [a for a in cluster.global_state.actor_table(None).values()
                  if a["JobID"] == jobs[0] and a["ActorClassName"] == "ClientAppActor"]
        assert {a["Address"]["NodeID"] for a in actors} == {cluster.head_node.node_id, worker.node_id}
    finally:
        cluster.shutdown()
