"""One federated job: resume or initialise, run the rounds, export.

Round k (docs/design.md, "One round"):
  sample online organizations (deadline) → push the global adapter →
  validate each reply as it arrives, feed the strategy, drop it →
  quorum check → new global → federated evaluation → checkpoint (atomic).

Round 0 is the evaluation of the initial adapter, whose B factors are zero:
it *is* the base model, so its metrics are the "base" column of the report.

Every reply is validated (server/validation.py) — train and evaluate alike —
and a bad one is recorded with its named reason (``rejected``,
``eval_rejected`` in the round's history), never applied. An accepted
update's weight is its example count, at most ``max-weight``; the round's
history records the cap and who was capped. Organizations are named by
``OrganizationNames`` (bound once per node; from enrollment with node
authentication), never by what a reply says alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from protos import codec, global_delta
from protos.adapter import Adapter, adapter_layout, init_adapter, layout_for_rank, select_factors, spec_for_rank
from protos.errors import RejectReason, UpdateRejected
from strategies.lora_rank import reduce_adapter
from protos.records import CONFIG_RECORD, LOCAL_METRIC_PREFIX, ORG_RECORD, SIMULATION_RECORD
from runtime import base_model
from server.checkpoint import Checkpoint, CheckpointStore
from server.downlink import Downlink, on_grid
from server.exchange import ExchangeResult, LateReplies, QuorumError, exchange, wait_for_nodes
from server.fault_points import fault_point
from server.job_config import JobConfig
from server.secure_aggregation import SecureRound, SecureSettings
from server.specialists import load_init_adapter
from server.traffic import CommBudgetExhausted, CountingGrid, check_budget
from server.privacy import PrivacyBudgetExhausted, PrivacyLedger
from server.validation import (
    EVALUATE_MAX_BYTES,
    OrganizationNames,
    UpdateValidator,
    check_evaluate_reply,
    check_metrics,
    derived_max_update_bytes,
    enrolled_names_from_env,
    network_text,
)
from strategies import AggregationError, Strategy

log = logging.getLogger("silotune.server")



class RoundObserver(Protocol):
    """Progress hooks; the CLI renders them, the default just logs."""

    def round_started(self, server_round: int, sampled: int) -> None: ...
    def reply(self, server_round: int, org: str, accepted: bool, detail: str) -> None: ...
    def round_finished(self, server_round: int, summary: dict[str, Any]) -> None: ...


class LogObserver:
    def round_started(self, server_round: int, sampled: int) -> None:
        log.info("round %d: %d organization(s) sampled", server_round, sampled)

    def reply(self, server_round: int, org: str, accepted: bool, detail: str) -> None:
        (log.info if accepted else log.warning)(
            "round %d: %s %s %s", server_round, org, "accepted" if accepted else "REJECTED", network_text(detail, 500)
        )

    def round_finished(self, server_round: int, summary: dict[str, Any]) -> None:
        log.info("round %d done: %s", server_round, {k: v for k, v in summary.items() if k != "eval"})


@dataclass
class JobState:
    server_round: int
    adapter: Adapter
    rng: np.random.Generator
    history: list[dict[str, Any]] = field(default_factory=list)
    org_names: dict[str, str] = field(default_factory=dict)   # node id (str) -> organization

    def run_state(self, cfg: JobConfig, fingerprint: str) -> dict[str, Any]:
        return {
            "job_id": cfg.job_id,
            "model": cfg.model,
            "fingerprint": fingerprint,
            "strategy": cfg.strategy,
            "rng": self.rng.bit_generator.state,
            "history": self.history,
            "org_names": self.org_names,
        }


class Job:
    def __init__(self, grid: Grid, cfg: JobConfig, observer: RoundObserver | None = None,
                 enrolled: Callable[[], Mapping[int, str]] | None = None) -> None:
        """``enrolled``: node id → enrolled name (default: the coordinator's enrollment
        registry when the SuperLink runs with node authentication, else none)."""
        self.grid = CountingGrid(grid)  # each round's summary says the bytes it moved (server/traffic.py)
        self.cfg = cfg
        self.observer = observer or LogObserver()
        self.store = CheckpointStore(cfg.checkpoint_dir)
        self.strategy: Strategy = cfg.build_strategy()
        self.shared_factors = tuple(self.strategy.factor_plan["share"])
        self.fingerprint = base_model.fingerprint(cfg.model)
        self.layout = adapter_layout(base_model.model_config(cfg.model), cfg.lora)
        self.late = LateReplies()  # instructions past their deadline whose replies are discarded
        # differentially private strategies: the (ε, δ) ledger, in every checkpoint; None otherwise
        # (run_dir: the dp-fedavg noise key lives in <run-dir>/secrets/, never in a checkpoint)
        self.privacy = PrivacyLedger.for_job(self.strategy, cfg.dp_epsilon_max, cfg.dp_delta, cfg.secure_aggregation,
                                             run_dir=cfg.run_dir)
        self.stop_reason: str | None = None  # why the job ended before num-rounds (privacy budget)
        self._online = 0  # organizations online at the last sampling
        self.validator = UpdateValidator(   # sender, size, duplicates: what the codec cannot check alone
            cfg.max_update_bytes or derived_max_update_bytes(select_factors(self.layout, self.shared_factors)))
        self.eval_validator = UpdateValidator(EVALUATE_MAX_BYTES, "the evaluate reply bound")
        self.enrolled = enrolled if enrolled is not None else enrolled_names_from_env()
        self._names: OrganizationNames | None = None
        self._capped: list[str] = []   # this attempt's organizations whose example count was capped
        # what organizations mask under secure aggregation (JobConfig.validate has checked it works)
        self.secure_input = self.strategy.secure_input() if cfg.secure_aggregation else None
        # Flower's Simulation Engine (run_simulation, `flwr run` on a simulation federation) drives
        # the ServerApp through an InMemoryGrid; a deployment through a SuperLink never does
        self.simulated = isinstance(grid, InMemoryGrid)  # the Grid Flower gave, not our counting wrapper
        # the global each node is sent (in full, as a delta, or the same again): server/downlink.py
        self.downlink = Downlink(cfg.global_encoding, cfg.global_delta)

    # ---- state -------------------------------------------------------------
    def _resume_or_init(self) -> JobState:
        checkpoint = self.store.latest()
        if checkpoint is None:
            rng = np.random.default_rng(self.cfg.seed)
            state = JobState(0, self.downlink.hold(self._initial_adapter()), rng)
            # round 0 scores the base model (continuing: the specialist it starts from); in a deployment the
            # agents may still be joining, and an evaluation of nobody would leave the report without its base column
            wait_for_nodes(self.grid, self.cfg.min_nodes, self.cfg.node_wait_timeout, self.cfg.poll_interval)
            self._evaluate(state)  # round 0: the starting adapter
            self._checkpoint(state)
            return state
        return self._resume(checkpoint)

    def _initial_adapter(self) -> Adapter:
        """A fresh adapter (B = 0: the base model), or with ``init-adapter`` the one continued
        training starts from (a registered specialist), checked against this job's layout and
        base model. Only a fresh job reads it: a resumed one continues from its checkpoint."""
        if not self.cfg.init_adapter:
            adapter = init_adapter(self.layout, self.cfg.seed)
        else:
            adapter = load_init_adapter(self.cfg.init_adapter, self.layout, self.cfg.lora, self.fingerprint)
        return on_grid(adapter, self.cfg.global_encoding)  # what the organizations will decode (server/downlink.py)

    def _resume(self, checkpoint: Checkpoint) -> JobState:
        saved = checkpoint.run_state
        for key, expected in (("job_id", self.cfg.job_id), ("fingerprint", self.fingerprint),
                              ("strategy", self.cfg.strategy)):
            if saved.get(key) != expected:
                raise RuntimeError(
                    f"checkpoint {checkpoint.path} belongs to another job ({key}={saved.get(key)!r}, "
                    f"this job has {expected!r}); use another run-dir"
                )
        if checkpoint.lora != self.cfg.lora:
            raise RuntimeError(f"checkpoint {checkpoint.path} has LoRA {checkpoint.lora}, job has {self.cfg.lora}")
        rng = np.random.default_rng()
        rng.bit_generator.state = saved["rng"]
        self.strategy.load_state_dict(checkpoint.strategy_state)
        if self.privacy is not None:
            self.privacy.load_state_dict(saved.get("privacy"))
        log.info("resuming job %s after round %d from %s", self.cfg.job_id, checkpoint.round, checkpoint.path)
        # a no-op unless the job resumes under another global-encoding: the next push must decode to what is held.
        # global-delta: the checkpoint is the global exactly as held; no node has proved it yet, full sends
        adapter = checkpoint.adapter if self.cfg.global_delta else on_grid(checkpoint.adapter,
                                                                           self.cfg.global_encoding)
        self.downlink.hold(adapter)
        return JobState(checkpoint.round, adapter, rng, list(saved["history"]), dict(saved["org_names"]))

    def _checkpoint(self, state: JobState) -> Checkpoint:
        fault_point("checkpoint-write", state.server_round)
        run_state = state.run_state(self.cfg, self.fingerprint)
        if self.privacy is not None:
            run_state["privacy"] = self.privacy.state_dict()
        return self.store.save(
            state.server_round,
            state.adapter,
            self.cfg.lora,
            self.cfg.model,
            run_state,
            self.strategy.state_dict(),
        )

    # ---- messages ----------------------------------------------------------
    def _instructions(self, state: JobState, server_round: int, nodes: list[int], message_type: str,
                      delta: bool = True) -> list[Message]:
        """One message per node, sharing at most three encoded copies of the global adapter
        (server/downlink.py: in full, as a delta, the same again; one without global-delta):
        the coordinator's memory stays O(P), not O(P × sampled organizations). ``delta=False``:
        in full to all (one content serves every node)."""
        if state.adapter is not self.downlink.current:   # set from outside the downlink: held afresh, sent in full
            self.downlink.hold(state.adapter)
        messages = []
        round_config = self._round_config(server_round)   # once: the strategy is asked once per instruction
        for push, group in self.downlink.pushes(nodes, delta):
            content = codec.encode(
                None,
                kind=codec.Kind.Value("GLOBAL"),
                job_id=self.cfg.job_id,
                server_round=server_round,
                fingerprint=self.fingerprint,
                lora=self.cfg.lora,
                tensors=push.tensors,
                global_digest=push.global_digest,
                base_digest=push.base_digest,
            )
            content[CONFIG_RECORD] = round_config.to_record()
            if self.simulated:  # virtual organizations build their silos from these; deployed agents never get them
                content[SIMULATION_RECORD] = self.cfg.simulation_settings().to_record()
            messages += [Message(content=content, dst_node_id=node, message_type=message_type,
                                 ttl=self.cfg.round_timeout + 60) for node in group]
        return messages

    def _whole_global_on_missing_base(self, state: JobState, server_round: int,
                                      message_type: str) -> Callable[[int, Message], Message | None]:
        """For ``exchange``'s ``resend``: an organization that answers a delta (or a digest) with
        GlobalBaseMissing gets the whole global at once, within the same deadline, instead of
        losing its round — once per exchange, so a peer that keeps saying so cannot loop. It
        happens where the process that takes a node's message is not the one that proved its
        global: a simulation's actors serve any virtual organization, a restarted runner."""
        resent: set[int] = set()

        def resend(node_id: int, reply: Message) -> Message | None:
            if (node_id in resent or not self.cfg.global_delta or not reply.has_error()
                    or global_delta.GlobalBaseMissing.__name__ not in reply.error.reason):
                return None
            resent.add(node_id)
            self.downlink.prove(node_id, "")
            log.info("round %d: %s lacks the base of its %s delta; sending it the whole global", server_round,
                     self._org(state, node_id), message_type)
            return self._instructions(state, server_round, [node_id], message_type)[0]

        return resend

    def _round_config(self, server_round: int) -> Any:
        """The job's round config plus what the strategy asks of the organizations."""
        plan = self.strategy.factor_plan
        extra = {key.replace("-", "_"): value for key, value in self.strategy.configure_train(server_round).items()}
        if self.secure_input is not None and self.secure_input.uniform:
            # DP-FedAvg under secure aggregation: the coordinator cannot clip what it cannot see,
            # so each organization clips its delta; no local noise, it goes once on the sum
            extra.update(dp_clip=self.secure_input.clip_norm, dp_noise=0.0)
        return self.cfg.round_config(
            server_round,
            train_factors=",".join(plan["train"]),
            share_factors=",".join(plan["share"]),
            rank_reduction=self.strategy.rank_reduction,
            **extra,
        )

    def _update_expectation(self, server_round: int, declared_rank: int) -> codec.Expectation:
        """What a valid update must look like. With heterogeneous ranks an
        organization may train any rank up to the global one; its tensors are
        then those of that rank, and only the factors the strategy shares."""
        rank = self.cfg.lora_r
        if self.strategy.supports_heterogeneous_ranks and 1 <= declared_rank <= self.cfg.lora_r:
            rank = declared_rank
        return codec.Expectation(
            kind=codec.Kind.Value("UPDATE"), job_id=self.cfg.job_id, server_round=server_round,
            fingerprint=self.fingerprint, lora=spec_for_rank(self.cfg.lora, rank),
            layout=select_factors(layout_for_rank(self.layout, rank), self.shared_factors),
        )

    def names(self, state: JobState) -> OrganizationNames:
        """The job's node id → name binding, over ``state.org_names`` (saved in checkpoints)."""
        if self._names is None or self._names.bound is not state.org_names:
            self._names = OrganizationNames(state.org_names, self.enrolled, online=self.grid.get_node_ids)
        return self._names

    def _org(self, state: JobState, node_id: int, reply: Message | None = None) -> str:
        """A node's organization name; a reply's claim binds one only as OrganizationNames allows."""
        return self.names(state).claim(node_id, reply)

    # ---- a round -----------------------------------------------------------
    def _sample(self, state: JobState) -> list[int]:
        online = wait_for_nodes(self.grid, self.cfg.min_nodes, self.cfg.node_wait_timeout, self.cfg.poll_interval)
        k = max(self.cfg.min_nodes, math.ceil(self.cfg.fraction_train * len(online)))
        # choose positions, not ids: node ids exceed int64 and numpy would turn them into floats
        picks = state.rng.choice(len(online), size=min(k, len(online)), replace=False)
        self._online = len(online)
        return sorted(online[int(i)] for i in picks)

    def _train(self, state: JobState, server_round: int) -> dict[str, Any]:
        """Train round ``server_round``; below quorum, retry it with a fresh sample
        up to ``round-retries`` times, then stop with a QuorumError."""
        started = time.monotonic()
        attempts = self.cfg.round_retries + 1
        for attempt in range(1, attempts + 1):
            sampled, result, accepted, rejected, losses = self._attempt(state, server_round)
            if len(accepted) >= self.cfg.quorum:
                break
            problem = (f"round {server_round}: {len(accepted)} valid update(s), quorum is {self.cfg.quorum} "
                       f"(rejected: {rejected}; no reply from nodes {result.timed_out})")
            if attempt == attempts:
                raise QuorumError(
                    f"{problem}; gave up after {attempt} attempt(s) (round-retries={self.cfg.round_retries}). "
                    "The last checkpoint is intact; restart to retry this round."
                )
            log.warning("%s: retrying the round with a fresh sample (retry %d of %d)",
                        problem, attempt, self.cfg.round_retries)
        fault_point("before-aggregate", server_round)
        state.adapter = self.downlink.advance(self.strategy.finish_round())  # as organizations will decode it
        if self.privacy is not None:
            self.privacy.released()
        fault_point("after-aggregate", server_round)
        total = sum(n for _, n in losses)
        return {
            "round": server_round,
            "sampled": len(sampled),
            "attempts": attempt,
            "accepted": accepted,
            "rejected": rejected,
            "timed_out": [self._org(state, n) for n in result.timed_out],
            "train_loss": sum(loss * n for loss, n in losses) / total if total else float("nan"),
            "train_seconds": time.monotonic() - started,
            # example counts above the cap count as the cap; under secure aggregation each organization
            # caps its own masked weight at secagg-max-weight, and the coordinator cannot see who did
            "max_weight": self.cfg.secagg_max_weight if self.cfg.secure_aggregation else self.cfg.max_weight,
            "capped": None if self.cfg.secure_aggregation else list(self._capped),
            **({"privacy": self.privacy.round_summary()} if self.privacy is not None else {}),
        }

    def _attempt(self, state: JobState, server_round: int) -> tuple[
            list[int], ExchangeResult, list[str], list[dict[str, str]], list[tuple[float, int]]]:
        """One try at a round: sample, push, fold in the valid replies until the deadline."""
        sampled = self._sample(state)
        if self.privacy is not None:  # stops the job here, before anything is pushed, if over budget
            self.privacy.before_round(server_round, len(sampled), self._online)
        fault_point("sampled", server_round)
        self.observer.round_started(server_round, len(sampled))
        references: dict[int, Adapter] = {}  # the global as each rank's organizations start from it
        self.strategy.begin_round(server_round, state.adapter)
        self.validator.begin_round(server_round)
        accepted: list[str] = []
        rejected: list[dict[str, str]] = []
        losses: list[tuple[float, int]] = []
        self._capped = []
        if self.cfg.secure_aggregation:
            result, accepted, rejected = self._secure_attempt(state, server_round, sampled)
            return sampled, result, accepted, rejected, losses

        def on_reply(node_id: int, reply: Message) -> None:
            org = self._org(state, node_id)
            try:
                self.validator.admit(node_id, reply)  # sender, one reply per node, size: before decoding
                org = self._org(state, node_id, reply)   # a name claim counts only once admitted
                if reply.has_error():
                    self.downlink.prove(node_id, "")   # e.g. GlobalBaseMissing: the whole global next time
                    raise UpdateRejected(RejectReason.CLIENT_ERROR, network_text(reply.error.reason, 500))
                header, update = codec.decode(reply.content)
                self.downlink.prove(node_id, header.global_digest)   # the global it trained from
                expectation = self._update_expectation(server_round, header.adapter.rank)
                codec.check_header(header, expectation)
                metrics = check_metrics(header.metrics)   # finite scalars, losses >= 0
                digest = self.validator.check_fresh(update)  # not an update already accepted
                rank = expectation.lora.rank
                if rank not in references:
                    references[rank] = select_factors(
                        reduce_adapter(state.adapter, rank, self.strategy.rank_reduction), self.shared_factors)
                claimed = int(header.num_examples)
                weight = min(claimed, self.cfg.max_weight)   # no organization outweighs max-weight examples
                try:   # the value checks (finite, norm bound) decide before the strategy's sums change
                    norm = self.strategy.accumulate_checked(update, weight, reference=references[rank],
                                                            norm_bound=self.cfg.norm_bound or None)
                except AggregationError as refusal:
                    raise UpdateRejected(RejectReason.STRATEGY_REFUSED, str(refusal)) from None
                self.validator.accepted(digest)
            except UpdateRejected as rejection:
                rejected.append({"org": org, "reason": rejection.reason.value, "detail": rejection.detail})
                self.observer.reply(server_round, org, False, str(rejection))
                return
            accepted.append(org)
            if "train_loss" in metrics:
                losses.append((metrics["train_loss"], weight))
            if weight < claimed:
                self._capped.append(org)
            capped = f" (weight capped at {weight}, max-weight)" if weight < claimed else ""
            self.observer.reply(server_round, org, True, f"n={claimed}{capped} |Δ|={norm:.3g}")
            fault_point("mid-pull", server_round)
            # `update` goes out of scope here: the coordinator keeps no reply.

        result = exchange(
            self.grid,
            self._instructions(state, server_round, sampled, MessageType.TRAIN),
            on_reply,
            timeout=self.cfg.round_timeout,
            poll_interval=self.cfg.poll_interval,
            late=self.late,
            what=f"the round {server_round} train instruction",
            on_pushed=lambda: fault_point("after-push", server_round),
            node_name=lambda node_id: self._org(state, node_id),
            resend=self._whole_global_on_missing_base(state, server_round, MessageType.TRAIN),
        )
        return sampled, result, accepted, rejected, losses

    def _secure_attempt(self, state: JobState, server_round: int, sampled: list[int]) -> tuple[
            ExchangeResult, list[str], list[dict[str, str]]]:
        """The train exchange under secure aggregation (server/secure_aggregation/round.py): four
        exchanges, after which the strategy holds the survivors' weighted mean (or, for
        dp-fedavg, the sum of their clipped deltas) and the coordinator has seen no
        single update."""
        settings = SecureSettings(self.cfg.secagg_clip, self.cfg.secagg_max_weight, self.cfg.secagg_threshold)
        secure = SecureRound(self.grid, settings, timeout=self.cfg.round_timeout, poll_interval=self.cfg.poll_interval,
                             late=self.late, node_name=lambda node_id: self._org(state, node_id))

        def on_reply(node_id: int, reply: Message | None, ok: bool, detail: str) -> None:
            # a name claim counts only in a reply the secure round accepted
            self.observer.reply(server_round, self._org(state, node_id, reply if ok else None), ok, detail)

        outcome = secure.run(
            job_id=self.cfg.job_id, server_round=server_round, sampled=sampled,
            train_content=self._instructions(state, server_round, sampled[:1], MessageType.TRAIN,
                                             delta=False)[0].content,   # one content for all: in full
            reference=select_factors(state.adapter, self.shared_factors), strategy=self.strategy,
            expectation=self._update_expectation(server_round, self.cfg.lora_r), on_reply=on_reply)
        rejected = [{"org": self._org(state, node), "reason": reason, "detail": detail}
                    for node, reason, detail in outcome.rejected]
        if outcome.failure:
            rejected.append({"org": "(all)", "reason": RejectReason.SECURE_AGGREGATION.value,
                             "detail": outcome.failure})
        result = ExchangeResult(replied=list(outcome.accepted), timed_out=outcome.timed_out)
        return result, [self._org(state, node) for node in outcome.accepted], rejected

    def _evaluate(self, state: JobState, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Federated evaluation of the current global adapter on the online organizations
        (all of them, or a ``fraction-evaluate`` sample for large fleets)."""
        summary = summary if summary is not None else {"round": state.server_round}
        online = sorted(self.grid.get_node_ids())
        if self.cfg.fraction_evaluate < 1.0 and online:
            # its own generator, seeded by the round: training's sampling sequence
            # (and so a resumed run's) does not depend on evaluation
            k = max(1, math.ceil(self.cfg.fraction_evaluate * len(online)))
            picks = np.random.default_rng([self.cfg.seed, state.server_round, 1]).choice(len(online), k, replace=False)
            online = sorted(online[int(i)] for i in picks)
        per_org: dict[str, dict[str, float]] = {}
        eval_rejected: list[dict[str, str]] = []
        self.eval_validator.begin_round(state.server_round)

        def on_reply(node_id: int, reply: Message) -> None:
            org = self._org(state, node_id)
            try:
                self.eval_validator.admit(node_id, reply)  # sender, one reply per node, size
                org = self._org(state, node_id, reply)   # a name claim counts only once admitted
                if reply.has_error():
                    self.downlink.prove(node_id, "")
                    raise UpdateRejected(RejectReason.CLIENT_ERROR, network_text(reply.error.reason, 500))
                metrics = check_evaluate_reply(reply.content, max(1, self.cfg.eval_max_examples))
                self.downlink.prove(node_id, str(reply.content.config_records[ORG_RECORD].get(
                    global_delta.EVAL_DIGEST_KEY, "")) if ORG_RECORD in reply.content.config_records else "")
                if org in per_org:   # names are bound one node each: cannot happen, never overwrite
                    raise UpdateRejected(RejectReason.DUPLICATE, f"{org} already evaluated")
            except UpdateRejected as rejection:
                eval_rejected.append({"org": org, "reason": rejection.reason.value, "detail": rejection.detail})
                log.warning("round %d: evaluation at %s REJECTED %s", state.server_round, org,
                            network_text(str(rejection), 500))
                return
            per_org[org] = metrics

        started = time.monotonic()
        exchange(
            self.grid,
            self._instructions(state, state.server_round, online, MessageType.EVALUATE),
            on_reply,
            timeout=self.cfg.round_timeout,
            poll_interval=self.cfg.poll_interval,
            late=self.late,
            what=f"the round {state.server_round} evaluate instruction",
            on_pushed=lambda: fault_point("mid-evaluate", state.server_round),
            node_name=lambda node_id: self._org(state, node_id),
            resend=self._whole_global_on_missing_base(state, state.server_round, MessageType.EVALUATE),
        )
        summary["eval"] = dict(sorted(per_org.items()))
        summary["eval_overall"] = overall_metrics(per_org)
        summary["eval_rejected"] = eval_rejected
        summary["names_refused"] = self.names(state).take_refused()   # this round's, train and evaluate
        summary["eval_seconds"] = time.monotonic() - started
        summary["bytes"] = self.grid.take()   # this round's instructions and replies, training and evaluation
        state.history.append(summary)
        self.observer.round_finished(state.server_round, summary)
        return summary

    # ---- the job -----------------------------------------------------------
    def run(self) -> Checkpoint:
        state = self._resume_or_init()
        for server_round in range(state.server_round + 1, self.cfg.num_rounds + 1):
            try:
                check_budget(state.history, server_round, self.cfg.comm_budget_mb)
                summary = self._train(state, server_round)
            except (PrivacyBudgetExhausted, CommBudgetExhausted) as stop:
                log.error("%s", stop)
                self.stop_reason = str(stop)
                break
            state.server_round = server_round
            self._evaluate(state, summary)
            summary["late_replies"] = self.late.take_discarded()
            self._checkpoint(state)
            fault_point("after-checkpoint", server_round)
        latest = self.store.latest()
        assert latest is not None and (latest.round == self.cfg.num_rounds or self.stop_reason)
        return latest


def overall_metrics(per_org: dict[str, dict[str, float]]) -> dict[str, float]:
    """Example-weighted means over organizations (perplexity from the pooled loss)."""
    total = sum(m.get("num_examples", 0.0) for m in per_org.values())
    if not total:
        return {}
    overall: dict[str, float] = {"num_examples": total}
    # macro-F1 too: the example-weighted mean of the organizations' own (their confusion counts stay
    # home); the local-only adapters' metrics (local-baseline) the same way
    for prefix in ("", LOCAL_METRIC_PREFIX):
        for key in (f"{prefix}{name}" for name in ("loss", "accuracy", "macro_f1", "exact_match")):
            rows = [(m[key], m["num_examples"]) for m in per_org.values() if key in m]
            if rows:
                overall[key] = sum(v * n for v, n in rows) / sum(n for _, n in rows)
        if f"{prefix}loss" in overall:
            overall[f"{prefix}perplexity"] = math.exp(min(overall[f"{prefix}loss"], 50.0))
    return overall
