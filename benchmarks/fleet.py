"""A fleet of virtual organizations on this machine: wall time, overhead, memory.

    python benchmarks/fleet.py                    # 1000 organizations, 10% per round (scenario "fleet")
    python benchmarks/fleet.py --organizations 100
    python benchmarks/fleet.py --no-write         # print the section, leave RESULTS.md as it is
    python benchmarks/fleet.py --flower-extractor # the baseline: Flower's own extractor thread

Measures, in one process:
* bare local training: ``train_adapter`` on one organization's data with the
  resident tiny model, on ONE thread (as each Ray actor trains), median over
  organizations — the work a client-round cannot avoid;
* the fleet: the same ClientApp and ServerApp on Flower's Simulation Engine
  (Ray actors, one CPU each); per round the training phase's wall time, from
  push to the last accepted reply;
* overhead per client-round = (train-phase wall time × actors) / clients
  sampled − bare training time: everything the federation adds per client
  (messages, encode/decode, validation, Ray scheduling, data loading);
* the same in CPU time: the actors' and this process's CPU seconds in the
  training phase, per client sampled, minus bare training's CPU seconds — a
  figure other work on a shared machine does not inflate as it does wall time;
* peak memory: RSS of this process and all its descendants (Ray actors,
  raylet, GCS) summed, polled every 0.25 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


class PeakMemory(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.peak_actor = 0
        self._halt = threading.Event()  # not _stop: that name is Thread's own (called after fork)

    def run(self) -> None:
        me = psutil.Process()
        while not self._halt.is_set():
            total, actor = 0, 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    total += rss
                    if "ClientAppActor" in " ".join(proc.cmdline()):
                        actor = max(actor, rss)
                except psutil.Error:
                    pass
            self.peak, self.peak_actor = max(self.peak, total), max(self.peak_actor, actor)
            time.sleep(0.25)

    def stop(self) -> None:
        self._halt.set()


class Timer:
    """RoundObserver that records each round's training phase: its wall time, and the CPU
    time the coordinator's process and the Ray actors spent in it. CPU time is what a
    client-round costs whatever else runs on the machine; wall time is what it takes here."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self._started = 0.0
        self._me = psutil.Process()
        self._actors: list[psutil.Process] = []
        self._cpu_started = (0.0, 0.0)

    def _cpu(self) -> tuple[float, float]:
        """(this process, the actors) CPU seconds so far."""
        actors = 0.0
        for actor in self._actors:
            try:
                times = actor.cpu_times()
                actors += times.user + times.system
            except psutil.Error:
                pass
        mine = self._me.cpu_times()
        return mine.user + mine.system, actors

    def round_started(self, server_round: int, sampled: int) -> None:
        if not self._actors:   # started by round 0's evaluation
            for proc in self._me.children(recursive=True):
                try:
                    if "ClientAppActor" in " ".join(proc.cmdline()):
                        self._actors.append(proc)
                except psutil.Error:
                    pass
        self._cpu_started = self._cpu()
        self._started = time.perf_counter()
        self.rounds.append({"round": server_round, "sampled": sampled, "accepted": 0})

    def reply(self, server_round: int, org: str, accepted: bool, detail: str) -> None:
        self.rounds[-1]["accepted"] += int(accepted)
        self.rounds[-1]["train_s"] = time.perf_counter() - self._started
        mine, actors = self._cpu()
        self.rounds[-1]["driver_cpu"] = mine - self._cpu_started[0]
        self.rounds[-1]["actor_cpu"] = actors - self._cpu_started[1]

    def round_finished(self, server_round: int, summary: dict[str, Any]) -> None:
        if self.rounds and self.rounds[-1]["round"] == server_round:
            self.rounds[-1]["eval_s"] = summary.get("eval_seconds", 0.0)


def _git_head() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def bare_training_seconds(cfg: Any, organizations: int, samples: int = 20) -> tuple[float, float]:
    """(wall, CPU) seconds of one organization's local training, medians."""
    import torch

    from clients.formatting import encode_example
    from clients.resident import get_resident
    from clients.silo import split_silo, virtual_silo
    from clients.trainer import TrainSettings, train_adapter

    torch.set_num_threads(1)
    resident = get_resident(cfg.model, cfg.lora)
    start = resident.adapter()
    times, cpu = [], []
    for pid in range(samples):
        silo = virtual_silo(cfg.sim_dataset, pid, organizations, skew=cfg.sim_skew,
                            max_records=cfg.sim_max_records, seed=cfg.seed)
        train = split_silo(silo, cfg.test_fraction, cfg.seed)[0]
        examples = [encode_example(resident.tokenizer, e.prompt, e.answer, cfg.max_length) for e in train.examples]
        settings = TrainSettings(cfg.local_steps, cfg.batch_size, cfg.learning_rate, seed=pid)
        begun, begun_cpu = time.perf_counter(), time.process_time()
        train_adapter(resident, start, examples, settings)
        times.append(time.perf_counter() - begun)
        cpu.append(time.process_time() - begun_cpu)
    torch.set_num_threads(os.cpu_count() or 1)
    return statistics.median(times[2:]), statistics.median(cpu[2:])  # the first calls warm up kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organizations", type=int, default=1000)
    parser.add_argument("--run-dir", default="runs/fleet-benchmark")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print the section only, append it nowhere")
    parser.add_argument("--flower-extractor", action="store_true",
                        help="the baseline: Flower's own extractor thread, not simulations/dispatch.py's")
    args = parser.parse_args()

    from simulations.runner import backend_config, run_scenario
    from simulations.scenario import load_scenario

    scenario = load_scenario("fleet")
    scenario.num_organizations = args.organizations
    cfg = scenario.job_config({"run-dir": args.run_dir,
                               "min-nodes": max(1, args.organizations // 10),
                               # 90% of the sample: BBC News holds duplicate articles, so two organizations
                               # with one training example each can send the same update, and the second is
                               # rightly refused as a duplicate; one such pair must not stop the benchmark
                               "min-replies": max(1, 9 * (args.organizations // 10) // 10)})
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    bare, bare_cpu = bare_training_seconds(cfg, args.organizations)
    actors = int(backend_config(scenario)["init_args"]["num_cpus"] // backend_config(scenario)["client_resources"]["num_cpus"])

    if args.flower_extractor:
        import contextlib

        import simulations.runner

        simulations.runner.delivering_in_one_scan = lambda: contextlib.nullcontext(False)  # type: ignore[assignment]

    import shutil
    shutil.rmtree(args.run_dir, ignore_errors=True)
    memory, timer = PeakMemory(), Timer()
    memory.start()
    began = time.perf_counter()
    run_scenario(scenario, cfg, timer)
    wall = time.perf_counter() - began
    memory.stop()

    rows = []
    for r in timer.rounds:
        per_client = r["train_s"] * actors / r["sampled"]
        cpu_client = (r["actor_cpu"] + r["driver_cpu"]) / r["sampled"]
        rows.append((r["round"], r["sampled"], r["accepted"], r["train_s"], per_client, per_client - bare,
                     r.get("eval_s", 0.0), r["actor_cpu"] / r["sampled"], r["driver_cpu"] / r["sampled"],
                     cpu_client - bare_cpu))
    steady = rows[1:] or rows[:1]
    overhead = statistics.median(row[5] for row in steady)
    overhead_cpu = statistics.median(row[9] for row in steady)
    flags = " --flower-extractor" if args.flower_extractor else ""
    lines = [
        f"## Fleet: {args.organizations} virtual organizations, {cfg.fraction_train:.0%} per round "
        f"({dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, code {_git_head()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; {actors} Ray actors × 1 CPU; model {cfg.model}, "
        f"{cfg.local_steps} local steps × batch {cfg.batch_size}. Command: `python benchmarks/fleet.py "
        f"--organizations {args.organizations}{flags}`. Load average before / after: {load_before} / "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "| round | sampled | accepted | train phase (s) | actor-s per client-round | overhead over bare (s) | eval (s) "
        "| actor CPU-s per client-round | coordinator CPU-s per client-round | CPU overhead over bare (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.3f} | {r[5]:+.3f} | {r[6]:.1f} | {r[7]:.3f} | {r[8]:.3f} "
          f"| {r[9]:+.3f} |" for r in rows],
        "",
        f"- bare local training per client (1 thread, median): **{bare:.3f} s**, {bare_cpu:.3f} CPU-s",
        f"- overhead per client-round (median of rounds after the first): **{overhead:.3f} s**, "
        f"{overhead / bare:.2f}× bare (target ≤ 0.1 s and ≤ 0.25×: "
        f"{'met' if overhead <= 0.1 and overhead <= 0.25 * bare else 'NOT met'})",
        f"- CPU overhead per client-round (actors' and coordinator's CPU time over bare training's, which "
        f"other work on the machine does not inflate as it does wall time): **{overhead_cpu:.3f} CPU-s**, "
        f"{overhead_cpu / bare_cpu:.2f}× bare",
        f"- whole run wall time: **{wall:.0f} s** (Ray start, round 0 evaluation, {len(rows)} rounds, export)",
        f"- peak memory, all processes: **{memory.peak / 2**30:.2f} GiB**; largest actor: "
        f"{memory.peak_actor / 2**20:.0f} MiB (the model is cached per actor, not per organization)",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.no_write:
        return
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as handle:
        handle.write("\n" + text)


if __name__ == "__main__":
    main()
