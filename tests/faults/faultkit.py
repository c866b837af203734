"""A fake fleet behind Flower's Grid, and forked coordinators to SIGKILL.

``FakeFleet`` is what the coordinator sees of Flower, without Flower's
processes: organizations are Python objects that answer each instruction
after a delay (as if they were training), deterministically — the update of
organization i in round k is the global plus a fixed pseudo-random delta of
(i, k) — so two runs with the same seed reach the same adapter bit for bit.
Like a real SuperLink it

* keeps a reply until its instruction's id is pulled, and makes it only then
  (a reply arriving after the coordinator's deadline waits there);
* lets organizations die (no reply ever; after ``offline_after`` seconds the
  node leaves ``get_node_ids`` and its instructions get Flower's
  NODE_UNAVAILABLE error reply), come back under a NEW node id (a restarted
  SuperNode registers again), or straggle (a delay per round).

``run_forked`` runs a whole coordinator (``Job.run``) in a forked child so a
test can SIGKILL it — from a fault point inside it or from outside at any
moment — and start another one on the same run dir. Forking from a process
that already imported transformers makes each coordinator start in
milliseconds instead of seconds.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON as NODE_UNAVAILABLE_REASON
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from protos import codec
from protos.round_config import CONFIG_RECORD, RoundConfig

NODE_BASE = 2**63 + 11  # real Flower node ids are uint64 and exceed int64


@dataclass
class FakeOrg:
    name: str
    index: int
    num_examples: int = 10
    #: seconds to answer an instruction of (round, kind); default: index * 0.02
    delay: Callable[[int, str], float] | None = None
    #: after this wall-clock time (time.monotonic()), the organization is dead
    dies_at: float | None = None
    #: round -> how many of that round's train instructions it ignores (its ClientApp
    #: crashed, the SuperNode lives on): {2: 1} loses the first try of round 2 only
    drops: dict[int, int] = field(default_factory=dict)
    #: it dies (SIGKILL of the whole agent) on receiving this round's train instruction
    dies_in_round: int | None = None
    #: ... and is restarted, registering under a new node id, once this round is evaluated
    rejoins_after_round: int | None = None
    #: instructions it received, as (round, kind) — tests assert on participation
    seen: list[tuple[int, str]] = field(default_factory=list)

    def dead(self, now: float) -> bool:
        return self.dies_at is not None and now >= self.dies_at

    def seconds(self, server_round: int, kind: str) -> float:
        return self.delay(server_round, kind) if self.delay else 0.02 * self.index

    def answer(self, message: Message, seed: int) -> Message:
        cfg = RoundConfig.from_record(message.content.config_records[CONFIG_RECORD])
        name = ConfigRecord({"name": self.name})
        if message.metadata.message_type == "evaluate":
            metrics = MetricRecord({"num_examples": 4.0, "loss": 1.0 + 0.01 * self.index, "accuracy": 0.5})
            return Message(RecordDict({"metrics": metrics, "organization": name}), reply_to=message)
        header, global_adapter = codec.decode(message.content)
        update = {k: v + delta(seed, cfg.server_round, self.index, k, v.shape) for k, v in global_adapter.items()}
        content = codec.encode(update, kind=codec.Kind.Value("UPDATE"), job_id=cfg.job_id,
                               server_round=cfg.server_round, fingerprint=header.base_model_fingerprint,
                               lora=cfg.lora, num_examples=self.num_examples,
                               metrics={"train_loss": 1.0 / cfg.server_round})
        content["organization"] = name
        return Message(content, reply_to=message)


def delta(seed: int, server_round: int, index: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Organization ``index``'s fixed training step in round ``server_round``."""
    salt = int.from_bytes(name.encode()[-8:].rjust(8, b"\0"), "little")
    rng = np.random.default_rng([seed, server_round, index, salt])
    return (rng.standard_normal(shape) * 0.01 + 0.001 * (index + 1)).astype(np.float32)


def node_unavailable(message: Message) -> Message:
    """The error reply Flower's SuperLink makes itself for an instruction to a node whose
    heartbeats stopped: it comes from the SuperLink (node 1), not from the node."""
    reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=NODE_UNAVAILABLE_REASON), reply_to=message)
    reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    reply.metadata.__dict__["_dst_node_id"] = SUPERLINK_NODE_ID
    return reply


class FakeFleet(Grid):
    """Organizations behind a Grid; see the module docstring."""

    def __init__(self, orgs: list[FakeOrg], seed: int = 0, offline_after: float = 1.0) -> None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.seed = seed
        self.offline_after = offline_after
        self.nodes: dict[int, FakeOrg] = {NODE_BASE + org.index: org for org in orgs}
        self._pending: dict[str, tuple[Message, float]] = {}
        self._ignored: set[str] = set()
        self._ids = itertools.count()
        self._next_node = itertools.count(NODE_BASE + 1000)
        self.pulled_ids: list[str] = []

    def rejoin(self, org: FakeOrg) -> int:
        """A restarted organization: alive again, under a new node id."""
        org.dies_at = None
        node_id = next(self._next_node)
        self.nodes[node_id] = org
        return node_id

    # -- Grid --
    def set_run(self, run):  # type: ignore[no-untyped-def]
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def _online(self, node_id: int, now: float) -> bool:
        """As Flower sees it: not replaced by a newer registration, heartbeats not overdue."""
        org = self.nodes[node_id]
        if node_id != max(n for n, o in self.nodes.items() if o is org):
            return False
        return org.dies_at is None or now < org.dies_at + self.offline_after

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        return [n for n in self.nodes if self._online(n, now)]

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        now = time.monotonic()
        for message in messages:
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self._pending[message_id] = (message, now)
            ids.append(message_id)
            org = self.nodes[message.metadata.dst_node_id]
            cfg = RoundConfig.from_record(message.content.config_records[CONFIG_RECORD])
            kind = message.metadata.message_type
            if org.dead(now):
                continue
            org.seen.append((cfg.server_round, kind))
            if kind == "train" and org.dies_in_round == cfg.server_round:
                org.dies_at = now
            if kind == "train" and org.drops.get(cfg.server_round, 0) > 0:
                org.drops[cfg.server_round] -= 1
                self._ignored.add(message_id)
            if kind == "evaluate":
                for other in {id(o): o for o in self.nodes.values()}.values():
                    if other.rejoins_after_round == cfg.server_round and other.dead(now):
                        other.rejoins_after_round = None
                        self.rejoin(other)
        return ids

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        replies = []
        now = time.monotonic()
        for message_id in message_ids:
            self.pulled_ids.append(message_id)
            if message_id not in self._pending:
                continue
            message, pushed = self._pending[message_id]
            node_id = message.metadata.dst_node_id
            org = self.nodes[node_id]
            cfg = RoundConfig.from_record(message.content.config_records[CONFIG_RECORD])
            kind = message.metadata.message_type
            done_at = pushed + org.seconds(cfg.server_round, kind)
            never = (org.dies_at is not None and org.dies_at <= done_at) \
                or message_id in self._ignored or not self._online(node_id, pushed)
            if never:
                if not self._online(node_id, now):  # Flower answers for a node whose heartbeats stopped
                    del self._pending[message_id]
                    replies.append(node_unavailable(message))
                continue
            if now - pushed < org.seconds(cfg.server_round, kind):
                continue
            del self._pending[message_id]
            replies.append(org.answer(message, self.seed))
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("silotune never waits for all replies")


# ---------------------------------------------------------------- forked coordinators
def job_config(run_dir: Path, **settings: Any):  # type: ignore[no-untyped-def]
    from server.job_config import JobConfig

    base: dict[str, Any] = dict(model="tiny-llama", job_id="faults", num_rounds=6, min_nodes=3, min_replies=3,
                                round_timeout=5.0, node_wait_timeout=3.0, poll_interval=0.01, lora_r=4,
                                strategy="fedadam", strategy_params="eta=0.01", run_dir=str(run_dir))
    base.update(settings)
    return JobConfig(**base)


def _coordinator(run_dir: str, settings: dict[str, Any], orgs: list[FakeOrg], fault: str | None,
                 mark: str | None, log_file: str, offline_after: float) -> None:
    import gc

    from server import fault_points
    from server.job import Job

    # Everything inherited from the parent (pytest, transformers) is long-lived: keep
    # the coordinator's gc.collect() after each pull from walking it every time.
    gc.freeze()
    logging.basicConfig(filename=log_file, level=logging.INFO, force=True,
                        format=f"%(asctime)s {os.getpid()} %(levelname)s %(name)s: %(message)s")
    if mark:
        os.environ[fault_points.MARK_ENV] = mark
    fault_points.arm(fault)
    try:
        Job(FakeFleet(orgs, offline_after=offline_after), job_config(Path(run_dir), **settings)).run()
    except BaseException as error:
        logging.getLogger("silotune.faults").error("coordinator stopped: %s: %s", type(error).__name__, error)
        raise


def run_forked(run_dir: Path, orgs: list[FakeOrg], *, fault: str | None = None, kill_after: float | None = None,
               timeout: float = 120.0, offline_after: float = 1.0, **settings: Any) -> int | None:
    """Run a coordinator in a forked child; return its exit code (-9: SIGKILLed).

    ``fault`` arms a fault point in the child; ``kill_after`` SIGKILLs it from
    here after that many seconds if it is still running.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    child = multiprocessing.get_context("fork").Process(
        target=_coordinator,
        args=(str(run_dir), settings, orgs, fault, str(run_dir / "faults.mark"), str(run_dir / "coordinator.log"),
              offline_after),
    )
    child.start()
    try:
        if kill_after is not None:
            child.join(kill_after)
            if child.exitcode is None:
                os.kill(child.pid, 9)
        child.join(timeout)
        if child.exitcode is None:
            raise TimeoutError(f"coordinator {child.pid} still running after {timeout}s: it hangs")
        return child.exitcode
    finally:
        if child.exitcode is None:
            os.kill(child.pid, 9)
            child.join(5)


def orgs(count: int, **kwargs: Any) -> list[FakeOrg]:
    return [FakeOrg(name=f"org-{i}", index=i, num_examples=10 * (i + 1), **kwargs) for i in range(count)]


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The round history in the newest checkpoint."""
    from server.checkpoint import CheckpointStore

    latest = CheckpointStore(run_dir / "checkpoints").latest()
    assert latest is not None, f"no checkpoint in {run_dir}"
    return list(latest.run_state["history"])


def log_text(run_dir: Path) -> str:
    path = run_dir / "coordinator.log"
    return path.read_text() if path.exists() else ""
