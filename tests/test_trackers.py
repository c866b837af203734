"""The round events in TensorBoard and MLflow (server/trackers/): the numbers of report.json,
read back from the tools' own files, under names that are safe whatever an organization
is called; nothing of either when a job does not ask for them."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from server.app import run_job
from server.exchange import QuorumError
from test_round_loop import ScriptedGrid, config, failing, honest

ROOT = Path(__file__).resolve().parent.parent
#: printable (so the coordinator binds it), but a path, markup and a long tail
HOSTILE = "../../etc/passwd <script>alert(1)</script> bank ü" + "x" * 70
SAFE_TAG = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,64}")


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the module: creating its tables takes seconds (each test has its own job id)."""
    return tmp_path_factory.mktemp("mlflow")


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag → step → value, from the event files as TensorBoard reads them (TFRecord framing,
    each record's masked CRC checked)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    scalars: dict[str, dict[int, float]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            record = data[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(record)
            pos += 16 + length
            event = Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def mlflow_run(mlflow_dir: Path, job_id: str):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    from server.trackers.mlflow import store_uri

    client = MlflowClient(tracking_uri=store_uri(mlflow_dir))
    experiment = client.get_experiment_by_name(job_id)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one run per job"
    return client, runs[0]


def mlflow_series(client, run, name: str) -> dict[int, float]:  # type: ignore[no-untyped-def]
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}


def test_each_round_goes_to_tensorboard_and_mlflow_with_the_numbers_of_the_report(
        tmp_path: Path, mlflow_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)   # nothing may land in the job's working directory
    grid = ScriptedGrid({1: honest(0.1, name="bank-a", eval_metrics={"num_examples": 4.0, "loss": 1.5,
                                                                     "accuracy": 0.25, "macro_f1": 0.125},
                                   metrics={"train_loss": 0.75}),
                         2: honest(0.2, name="bank-b", metrics={"train_loss": 0.25})})
    cfg = config(tmp_path / "run", job_id="both-on", num_rounds=2, tensorboard_dir=str(tmp_path / "tb"),
                 mlflow_dir=str(mlflow_dir))
    run_job(grid, cfg)

    history = json.loads((tmp_path / "run" / "report.json").read_text())["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    tensorboard = tensorboard_scalars(tmp_path / "tb" / "both-on")
    client, run = mlflow_run(mlflow_dir, "both-on")
    expected = {f"eval/{org}/{metric}": {h["round"]: h["eval"][org][metric] for h in history}
                for org in ("bank-a", "bank-b") for metric in history[-1]["eval"][org]}
    expected |= {f"eval/overall/{metric}": {h["round"]: h["eval_overall"][metric] for h in history}
                 for metric in history[-1]["eval_overall"]}
    assert history[1]["train_loss"] == pytest.approx(0.5)
    expected |= {"train/loss": {h["round"]: h["train_loss"] for h in history[1:]},   # round 0 trains nothing
                 "round/accepted": {1: 2, 2: 2}, "round/rejected": {1: 0, 2: 0}, "round/sampled": {1: 2, 2: 2}}
    assert "eval/bank-a/macro_f1" in expected and "eval/overall/accuracy" in expected
    for name, series in expected.items():
        assert tensorboard[name] == pytest.approx(series, rel=1e-6), name   # float32 in the event file
        assert mlflow_series(client, run, name) == pytest.approx(series, rel=1e-12), name
    assert set(tensorboard["train/seconds"]) == {1, 2}
    assert set(tensorboard) == set(run.data.metrics)   # the same scalars in both

    assert run.info.status == "FINISHED" and run.info.run_name == "both-on"
    assert run.data.params["num-rounds"] == "2" and run.data.params["strategy"] == "fedavg"
    assert run.data.params["tensorboard-dir"] == str(tmp_path / "tb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tb"]   # no ./mlruns


def test_a_resumed_job_continues_its_mlflow_run(tmp_path: Path, mlflow_dir: Path) -> None:
    grid = ScriptedGrid({1: honest(0.1, name="bank-a"), 2: honest(0.2, name="bank-b")})
    settings = dict(job_id="resumed", tensorboard_dir=str(tmp_path / "tb"), mlflow_dir=str(mlflow_dir))
    run_job(grid, config(tmp_path / "run", num_rounds=1, **settings))
    run_job(grid, config(tmp_path / "run", num_rounds=2, **settings))   # resumes after round 1

    client, run = mlflow_run(mlflow_dir, "resumed")
    assert run.info.status == "FINISHED"
    assert sorted(mlflow_series(client, run, "eval/bank-a/accuracy")) == [0, 1, 2]
    assert run.data.params["num-rounds"] == "1" and run.data.tags["silotune.changed.num-rounds"] == "2"
    assert sorted(tensorboard_scalars(tmp_path / "tb" / "resumed")["eval/bank-b/loss"]) == [0, 1, 2]


def test_a_job_that_fails_ends_its_mlflow_run_failed(tmp_path: Path, mlflow_dir: Path) -> None:
    grid = ScriptedGrid({1: honest(0.1, name="bank-a"), 2: failing})
    with pytest.raises(QuorumError):
        run_job(grid, config(tmp_path / "run", job_id="fails", num_rounds=2, mlflow_dir=str(mlflow_dir)))
    client, run = mlflow_run(mlflow_dir, "fails")
    assert run.info.status == "FAILED" and "quorum" in run.data.tags["silotune.error"]
    assert sorted(mlflow_series(client, run, "eval/bank-a/accuracy")) == [0]   # the base round was logged


def test_a_hostile_organization_name_becomes_a_safe_tag_that_maps_back_to_it(
        tmp_path: Path, mlflow_dir: Path) -> None:
    grid = ScriptedGrid({1: honest(0.1, name=HOSTILE, eval_metrics={"num_examples": 4.0, "loss": 0.5,
                                                                    "accuracy": 0.75}),
                         2: honest(0.2, name="bank-b")})
    run_job(grid, config(tmp_path / "run", job_id="hostile", tensorboard_dir=str(tmp_path / "tb"),
                         mlflow_dir=str(mlflow_dir)))
    history = json.loads((tmp_path / "run" / "report.json").read_text())["history"]
    assert HOSTILE in history[-1]["eval"]   # the coordinator took the name: it reaches the trackers as it is

    tensorboard = tensorboard_scalars(tmp_path / "tb" / "hostile")
    for name in tensorboard:
        parts = name.split("/")
        assert all(SAFE_TAG.fullmatch(part) for part in parts), name
    names = json.loads((tmp_path / "tb" / "hostile" / "names.json").read_text(encoding="ascii"))
    [(tag, original)] = names.items()
    assert original == HOSTILE and tag not in HOSTILE
    assert tensorboard[f"eval/{tag}/accuracy"] == {h["round"]: h["eval"][HOSTILE]["accuracy"] for h in history}
    assert all(p.parent == tmp_path / "tb" / "hostile" for p in (tmp_path / "tb").rglob("*") if p.is_file())

    client, run = mlflow_run(mlflow_dir, "hostile")
    assert run.data.tags[f"silotune.name.{tag}"] == HOSTILE
    assert mlflow_series(client, run, f"eval/{tag}/accuracy") == {h["round"]: 0.75 for h in history}


def test_names_chosen_to_collide_still_get_tags_of_their_own() -> None:
    from server.trackers.base import TagNames

    tag = TagNames()
    first = tag("a/b")
    second = tag(first)   # a name that is the first one's tag, taken
    third = tag("a?b")    # sanitized to the same readable part
    assert len({first, second, third, tag("overall"), "overall"}) == 5
    assert tag("a/b") == first and tag("bank-a") == "bank-a" and tag("..") != ".." and tag("") != ""
    assert tag.changed == {first: "a/b", second: first, third: "a?b", tag("overall"): "overall",
                           tag(".."): "..", tag(""): ""}


def test_with_both_off_no_folder_is_made_and_neither_library_is_imported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    grid = ScriptedGrid({1: honest(0.1), 2: honest(0.2)})
    run_job(grid, config(tmp_path / "run", job_id="off"))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert not {p.name for p in (tmp_path / "run").iterdir()} & {"tb", "mlflow", "mlruns", "mlflow.db"}

    # in a fresh interpreter: this one may have imported them for the tests above
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']\n"
              "from server.app import run_job\n"
              "from test_round_loop import ScriptedGrid, config, honest\n"
              "from pathlib import Path\n"
              "run_job(ScriptedGrid({1: honest(0.1), 2: honest(0.2)}), config(Path(sys.argv[2]), job_id='off'))\n"
              "print(sorted(m for m in ('mlflow', 'tensorboardX') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script, str(ROOT), str(tmp_path / "fresh")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
