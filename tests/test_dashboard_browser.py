"""The operator's dashboard in a real browser (Debian's headless Chromium, driven by Selenium)
while a real job runs: the round loop (server/app.py's run_job) on a scripted grid, held in
the middle of a round, writes its events; the page finds that round's row, marked current, and
each organization's learning curve; when the round ends, the page follows by itself.

CI installs Chromium (.ci/run); there a missing browser fails this test. On a machine without
one it is skipped."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from flwr.app import Message

from protos.round_config import CONFIG_RECORD, RoundConfig
from runtime.flower_processes import alive, stop_process_tree
from server.dashboard.server import DashboardServer
from server.events import EVENTS_FILE, ROUND_STARTED, read_events
from server.service.store import JobStore
from test_round_loop import ScriptedGrid, config, failing, honest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
HOSTILE = "<i>bank-b</i>"   # an organization name that is markup: it must show as these characters
HELD_ROUND = 2


def browser_or_skip():  # type: ignore[no-untyped-def]
    """Selenium's webdriver module; in CI a missing browser fails the test instead of skipping it."""
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    missing = [what for what, found in (("chromium", CHROMIUM), ("chromedriver (chromium-driver)", CHROMEDRIVER),
                                        ("selenium (pip install -e '.[dev]')", webdriver)) if not found]
    if missing:
        message = f"the dashboard's browser test needs {', '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs them)")
        pytest.skip(message)
    return webdriver


def start_chromium(webdriver):  # type: ignore[no-untyped-def]
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1800", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)   # --no-sandbox: CI runs as root
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def held_at(round_number: int, gate: threading.Event, handler):  # type: ignore[no-untyped-def]
    """``handler``, except that its train reply of ``round_number`` waits for ``gate``: the round
    loop, pulling it, stays inside that round."""
    def handle(message: Message) -> Message:
        if message.metadata.message_type == "train":
            cfg = RoundConfig.from_record(message.content.config_records[CONFIG_RECORD])
            if cfg.server_round == round_number:
                gate.wait(120)
        return handler(message)
    return handle


def latest_round_started(run_dir: Path) -> int | None:
    started = [e["round"] for e in read_events(run_dir / EVENTS_FILE) if e["event"] == ROUND_STARTED]
    return started[-1] if started else None


def wait_for(condition, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


CURVES_JS = """
const canvas = document.getElementById('curve');
const chart = (typeof Chart !== 'undefined' && canvas) ? Chart.getChart(canvas) : null;
return chart ? chart.data.datasets.map(d => [d.label, d.data.length]) : null;
"""


# read in one script, inside the page: the page redraws its tables every two seconds, so an element
# found by one WebDriver call may be gone by the next
CURRENT_ROW_JS = """
const rows = document.querySelectorAll('#rounds tbody tr.current');
return rows.length === 1 ? [Number(rows[0].dataset.round), rows[0].dataset.state] : null;
"""
JOB_ROW_JS = """
const row = document.querySelector(`#jobs tbody tr[data-job="${arguments[0]}"]`);
return row ? [row.dataset.state, row.textContent] : null;
"""


@pytest.mark.slow
def test_the_dashboard_shows_the_current_round_and_each_organizations_curve_during_a_running_job(
        tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    webdriver = browser_or_skip()
    # the job as the coordinator service records it (server/service/store.py), running
    store = JobStore(tmp_path / "state")
    job_id = store.mark_running(store.create("bbc-topics", {"num-rounds": 3, "metric": "accuracy",
                                                            "strategy": "fedavg"}).id).id
    state_dir, run_dir = store.state_dir, Path(store.get(job_id).run_dir)
    gate = threading.Event()
    grid = ScriptedGrid({1: honest(0.1, name="bank-a", eval_metrics={"num_examples": 4.0, "loss": 1.5,
                                                                       "accuracy": 0.25}),
                         2: held_at(HELD_ROUND, gate, honest(0.2, name=HOSTILE)),
                         3: failing})   # every train reply refused by name: the rejections table
    cfg = config(run_dir, job_id=job_id, num_rounds=3, min_nodes=3, min_replies=2, round_timeout=120.0)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        from server.app import run_job

        try:
            run_job(grid, cfg)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            outcome["error"] = err

    job = threading.Thread(target=run, name="live-job", daemon=True)
    job.start()
    dashboard = DashboardServer(state_dir, "127.0.0.1", 0)
    driver = None
    driver_pid = None
    try:
        wait_for(lambda: latest_round_started(run_dir) == HELD_ROUND or outcome, 120, f"round {HELD_ROUND} to start")
        assert not outcome, outcome
        dashboard.start()
        driver = start_chromium(webdriver)
        driver_pid = driver.service.process.pid
        driver.get(dashboard.url)

        # the job is in round 2: its row is there and marked current
        current_round, round_state = wait_for(lambda: driver.execute_script(CURRENT_ROW_JS), 30,
                                              "the current round's row")
        assert current_round == latest_round_started(run_dir) == HELD_ROUND
        assert round_state == "running" and job.is_alive()
        job_state, job_text = driver.execute_script(JOB_ROW_JS, job_id)
        assert job_state == "running" and f"{HELD_ROUND} / 3" in job_text

        # each organization's learning curve: a dataset labelled with its name, one point per evaluated round
        curves = dict(wait_for(lambda: driver.execute_script(CURVES_JS), 30, "the chart"))
        assert curves["bank-a"] >= 1 and curves[HOSTILE] >= 1
        assert driver.find_element(By.ID, "curve").get_attribute("data-metric") == "accuracy"

        # a rejection with its reason; a name that is markup shows as text and makes no element
        rejections = driver.find_element(By.ID, "rejections").text
        assert "SiloNoRows" in rejections
        assert HOSTILE in driver.find_element(By.ID, "rounds").text
        assert driver.find_elements(By.CSS_SELECTOR, "main i") == []
        driver.save_screenshot(str(tmp_path / "dashboard.png"))

        # the round ends: the page follows without a reload
        gate.set()
        wait_for(lambda: driver.execute_script(CURRENT_ROW_JS) == [3, "finished"], 60,
                 "the page to follow the job to its end")
        job.join(60)
        assert not job.is_alive() and not outcome, outcome
        store.mark_finished(job_id, 1)
        wait_for(lambda: (driver.execute_script(JOB_ROW_JS, job_id) or [None])[0] == "finished", 30,
                 "the job's row to say finished")

        # the page ran under its Content-Security-Policy without an error (Chart.js included)
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        gate.set()
        if driver is not None:
            driver.quit()
        if driver_pid is not None:   # chromedriver and every Chromium process under it, by PID
            assert alive(stop_process_tree(driver_pid, grace=5)) == []
        dashboard.stop()
        job.join(60)
