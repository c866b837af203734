"""What an organization does with one instruction, independent of where it runs.

``train`` and ``evaluate`` take the instruction's content (a Flower RecordDict),
this node's config and its persistent state, and return the reply's content.
The ClientApp runs them in its own process, or hands them to the
organization's resident trainer (a long-lived Ray actor that keeps the base
model loaded: clients/resident_trainer.py) — the same code either way.

Every reply carries ``base_model_loads`` and ``resident_pid`` in its metrics,
so that a deployment can show (not assume) that the base model was loaded
once per organization rather than once per round.

With node config ``train-workers`` N > 1 (``agent start --train-workers N``)
training runs on N Ray Train workers (DDP, clients/distributed.py) on the
agent's Ray, from the same global adapter, examples and settings; the reply
then says ``train_workers`` N. Those workers are a fresh group each round and
each loads the base model again: ``base_model_loads`` counts the resident
process's loads only, which still serve evaluation.

The organization's policy (clients/policy.py, ``policy_for(node_config)``)
is enforced in ``_receive``: every rule the instruction alone decides is
checked before the base model is loaded, the silo file opened or anything
trained; the two that need the split sizes right after loading. A refusal is
a ``PolicyViolation``, logged here with its rule and detail; the error reply
says only the rule. A secure-aggregation round's train stage
(clients/secure_aggregation.py) comes through ``train`` with the
secure-aggregation record still in the content, and its session in ``state``.
Locally noised updates are charged to the agent's ε ledger
(clients/privacy.py) before they leave, and only the metrics the policy lets
out are sent.

With the job setting ``global-delta`` the instruction's global may be a
difference from one this process holds, or only its digest: it is rebuilt and
checked in ``clients/global_cache.py``, and the reply names the global it
started from (an evaluate reply in its organization record).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clients import attacks, global_cache, local_baseline, privacy
from clients import resident as resident_module
from clients import train_workers
from clients.evaluation import evaluate_examples
from clients.local_data import LocalData, local_data, local_rank, org_name
from clients.node_config import TRAINER_ACTOR_KEY
from clients.policy import OrganizationPolicy, PolicyViolation, Request, policy_for
from clients.resident import ResidentModel, get_resident
from clients.trainer import TrainSettings, train_adapter
from protos import codec, global_delta
from protos.secagg import MaskingClient, wire
from protos.adapter import Adapter, LoraSpec, layout_for_rank, parse_factors, select_factors, spec_for_rank
from strategies.lora_rank import reduce_adapter
from protos.records import CONFIG_RECORD, METRICS_RECORD, ORG_RECORD, SIMULATION_RECORD
from protos.round_config import RoundConfig, SimulationSettings

log = logging.getLogger("silotune.client")

LOCAL_FACTORS_STATE = "silotune.local-factors"


@dataclass
class Instruction:
    cfg: RoundConfig
    sim: SimulationSettings | None  # virtual organizations of a simulation only
    spec: LoraSpec            # this organization's own spec (its rank)
    resident: ResidentModel
    adapter: Adapter          # the global, at this organization's rank, with its local factors
    data: LocalData
    policy: OrganizationPolicy
    request: Request          # what the instruction asks, as the policy judged it
    ledger: privacy.EpsilonLedger | None
    global_digest: str        # global-delta: the global's digest, proved back in the reply ("" otherwise)


def _receive(kind: str, content: RecordDict, node_config: dict, state: RecordDict) -> Instruction:
    cfg = RoundConfig.from_record(content.config_records[CONFIG_RECORD])
    sim_record = content.config_records.get(SIMULATION_RECORD)
    sim = SimulationSettings.from_record(sim_record) if sim_record is not None else None
    # global-delta: the global rebuilt from one this process holds, digest checked (clients/global_cache.py)
    header, global_adapter = global_cache.resolve(*codec.decode(content))
    # the policy first: nothing below (model, silo, training) happens for a refused instruction
    policy = policy_for(node_config)
    request = Request(kind=kind, job_id=cfg.job_id, server_round=cfg.server_round, model=cfg.model,
                      fingerprint=header.base_model_fingerprint, rank=local_rank(node_config, cfg, sim),
                      batch_size=cfg.batch_size, local_steps=cfg.local_steps, eval_examples=cfg.eval_max_examples,
                      dp_clip=cfg.dp_clip, dp_noise=cfg.dp_noise, secure_session=_secure_session(content, state),
                      dataset=cfg.dataset)
    policy.check(request)
    ledger = privacy.ledger_for(node_config)
    if kind == "train":
        policy.check_budget(request, ledger)
    spec = spec_for_rank(cfg.lora, request.rank)
    resident = get_resident(cfg.model, spec)
    codec.check_header(
        header,
        codec.Expectation(
            kind=codec.Kind.Value("GLOBAL"),
            job_id=cfg.job_id,
            server_round=cfg.server_round,
            fingerprint=resident.fingerprint,
            lora=cfg.lora,
            layout=layout_for_rank(resident.layout, cfg.lora.rank),
        ),
    )
    codec.check_values(global_adapter)
    adapter = reduce_adapter(global_adapter, spec.rank, cfg.rank_reduction)
    adapter.update(_local_factors(state))
    data = local_data(node_config, cfg, sim, resident.tokenizer)
    policy.check_data(request, train_examples=len(data.train), eval_examples=len(data.test[:cfg.eval_max_examples]))
    # global-delta: prove holding the global only where it outlives this message (a simulation actor, the
    # resident trainer); a process per message proves nothing and is always sent the whole global
    keeps = sim is not None or TRAINER_ACTOR_KEY in node_config
    return Instruction(cfg, sim, spec, resident, adapter, data, policy, request, ledger,
                       header.global_digest if keeps else "")


def _secure_session(content: RecordDict, state: RecordDict) -> int | None:
    """The fewest inputs of a sum the coordinator can unmask in the secure-aggregation session
    this train stage belongs to — its organizations N and its threshold t, the smaller; None:
    a plain round.

    clients/secure_aggregation.py hands its mask stage's content here with the
    secure-aggregation record in it; the session it joined at the advertise
    stage (where its floor was checked first) is in this node's state (0 when
    there is none: nothing to count on)."""
    if not wire.is_secagg(content):
        return None
    record = state.config_records.get(wire.STATE_RECORD)
    if record is None:
        return 0
    session = MaskingClient.restore(dict(record)).session
    return min(len(session.participants), session.threshold)


def _refusals_logged(kind: str) -> Callable[[Callable[..., RecordDict]], Callable[..., RecordDict]]:
    """The agent's own log names the rule and why; the error reply names the rule only."""
    def wrap(handler: Callable[..., RecordDict]) -> Callable[..., RecordDict]:
        @functools.wraps(handler)
        def logged(content: RecordDict, node_config: dict, state: RecordDict) -> RecordDict:
            try:
                return handler(content, node_config, state)
            except PolicyViolation as refusal:
                record = content.config_records.get(CONFIG_RECORD) or {}
                job, server_round = record.get("job_id", "?"), record.get("server_round", "?")
                log.warning("%s refused the %s instruction of job %r round %s: policy rule %s (%s)",
                            org_name(node_config), kind, job, server_round, refusal.rule, refusal.detail)
                raise
        return logged
    return wrap


def _local_factors(state: RecordDict) -> Adapter:
    record = state.array_records.get(LOCAL_FACTORS_STATE)
    return {name: array.numpy() for name, array in record.items()} if record else {}


def _keep_local_factors(state: RecordDict, adapter: Adapter, shared: tuple[str, ...]) -> None:
    local = {name: value for name, value in adapter.items() if name not in select_factors(adapter, shared)}
    if local:
        state[LOCAL_FACTORS_STATE] = ArrayRecord(array_dict={k: Array(v) for k, v in local.items()})


def _org_seed(seed: int, server_round: int, org: str) -> int:
    digest = hashlib.sha256(f"{seed}:{server_round}:{org}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _process_metrics() -> dict[str, float]:
    return {"base_model_loads": float(resident_module.LOAD_COUNT), "resident_pid": float(os.getpid())}


@_refusals_logged("train")
def train(content: RecordDict, node_config: dict, state: RecordDict) -> RecordDict:
    """Train locally; the reply holds the shared factors, a header and scalar metrics."""
    ins = _receive("train", content, node_config, state)
    cfg = ins.cfg
    shared = parse_factors(cfg.share_factors)
    with ins.resident.lock:
        settings = TrainSettings(
            local_steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            seed=_org_seed(cfg.seed, cfg.server_round, ins.data.org_name),
            trained_factors=parse_factors(cfg.train_factors),
            proximal_mu=cfg.proximal_mu,
        )
        adapter, metrics = _train_on_devices(ins, settings, train_workers.plan_from_node_config(node_config))
    _keep_local_factors(state, adapter, shared)
    if cfg.local_baseline:  # the organization's own yardstick: kept here, never sent
        _train_local_only(ins, settings, state)
    if cfg.dp_clip > 0:  # differential privacy at the organization: clip (and noise) what is sent
        adapter = privacy.privatize(ins.adapter, adapter, tuple(select_factors(adapter, shared)), cfg.dp_clip,
                                    cfg.dp_noise, privacy.noise_generator(node_config, cfg.server_round, ins.data.org_name))
        metrics = {**metrics, "dp_clip": cfg.dp_clip, "dp_noise": cfg.dp_noise}
    log.info("%s round %d: loss %.4f (%d steps, rank %d)", ins.data.org_name, cfg.server_round,
             metrics["train_loss"], int(metrics["train_steps"]), ins.spec.rank)
    attack = ins.sim.sim_attack if ins.sim is not None else ""  # simulation experiments only
    sent = attacks.maybe_attack(node_config, attack, cfg.seed, ins.adapter, adapter)
    if ins.request.local_noise and ins.ledger is not None:
        ins.policy.charge(ins.request, ins.ledger)  # before the update leaves; refused if over a cap now
    dp = ins.policy.under_local_dp(ins.request)  # then only what DP protects leaves
    reply = codec.encode(
        select_factors(sent, shared),
        kind=codec.Kind.Value("UPDATE"),
        job_id=cfg.job_id,
        server_round=cfg.server_round,
        fingerprint=ins.resident.fingerprint,
        lora=ins.spec,
        num_examples=1 if dp else len(ins.data.train),  # dp-fedavg weighs organizations equally anyway
        metrics=ins.policy.outgoing_metrics({**metrics, **_process_metrics()}, dp=dp),
        encoding=codec.encoding_from_name(cfg.update_encoding),
        global_digest=ins.global_digest,
    )
    reply[ORG_RECORD] = ConfigRecord({"name": ins.data.org_name})
    return reply


def _train_local_only(ins: Instruction, base: TrainSettings, state: RecordDict) -> None:
    """This round's local-only training (clients/local_baseline.py): the federated round's
    budget, from this organization's own local-only adapter, kept in ``state``."""
    cfg = ins.cfg
    if local_baseline.trained_in(state, cfg.job_id, cfg.server_round):
        return  # a retried or resumed round: one local-only training per round
    start = local_baseline.stored(state, cfg.job_id, ins.resident.layout)
    if start is None:  # its first round: where the federation started
        start = ins.adapter if cfg.server_round == 1 else local_baseline.initial_adapter(
            cfg, ins.resident.layout, ins.spec.rank)
    settings = local_baseline.train_settings(
        base, _org_seed(cfg.seed, cfg.server_round, f"{ins.data.org_name}/local-only"))
    with ins.resident.lock:
        adapter, metrics = train_adapter(ins.resident, start, ins.data.train, settings)
    local_baseline.keep(state, adapter, cfg.job_id, cfg.server_round)
    log.info("%s round %d: local-only loss %.4f", ins.data.org_name, cfg.server_round, metrics["train_loss"])


def _train_on_devices(ins: Instruction, settings: TrainSettings,
                      plan: train_workers.DevicePlan) -> tuple[Adapter, dict[str, float]]:
    """In this process, or on the plan's Ray Train workers."""
    if not plan.distributed:
        adapter, metrics = train_adapter(ins.resident, ins.adapter, ins.data.train, settings)
        return adapter, {**metrics, "train_workers": 1.0}
    import ray

    from clients.distributed import train_adapter_distributed

    if not ray.is_initialized():
        raise train_workers.TrainWorkersError(
            f"{plan.train_workers} train workers run on the agent's Ray: this process has none (--no-resident?)")
    if settings.batch_size < plan.train_workers:  # a worker with no example in a batch would fail inside Ray Train
        raise train_workers.TrainWorkersError(
            f"batch size {settings.batch_size} < {plan.train_workers} train workers: every worker needs an example")
    # the resident trainer (this actor) keeps what it holds while it waits for the workers
    context = ray.get_runtime_context()
    held = context.get_assigned_resources() if context.get_actor_id() else {}  # a driver holds nothing
    train_workers.check_capacity(plan, ray.cluster_resources(), held)
    return train_adapter_distributed(ins.cfg.model, ins.spec, ins.adapter, ins.data.train, settings,
                                     num_workers=plan.train_workers, use_gpu=plan.use_gpu)


@_refusals_logged("evaluate")
def evaluate(content: RecordDict, node_config: dict, state: RecordDict) -> RecordDict:
    """Score the global adapter (with local factors) on the local test split, and with
    ``local-baseline`` this organization's local-only adapter on the same examples."""
    ins = _receive("evaluate", content, node_config, state)
    local = local_baseline.stored(state, ins.cfg.job_id, ins.resident.layout) if ins.cfg.local_baseline else None
    with ins.resident.lock:
        metrics = _score(ins, ins.adapter)
        if local is not None:  # none before its first training (round 0: the base model)
            metrics.update(local_baseline.local_metrics(_score(ins, local)))
    sent = ins.policy.outgoing_metrics({**metrics, **_process_metrics()}, dp=ins.policy.under_local_dp(ins.request))
    org = {"name": ins.data.org_name}
    if ins.global_digest:  # global-delta: the global this organization now holds
        org[global_delta.EVAL_DIGEST_KEY] = ins.global_digest
    return RecordDict({METRICS_RECORD: MetricRecord(sent), ORG_RECORD: ConfigRecord(org)})


def _score(ins: Instruction, adapter: Adapter) -> dict[str, float]:
    """``adapter`` on the held-out examples the instruction asks for (the caller holds the lock).
    Whoever uses the resident model next loads its own adapter first."""
    data, limit = ins.data, ins.cfg.eval_max_examples
    ins.resident.load_adapter(adapter)
    return evaluate_examples(
        ins.resident,
        data.test[:limit],
        data.test_labels[:limit] if data.test_labels is not None else None,
        data.silo.labels,
    )


HANDLERS = {"train": train, "evaluate": evaluate}
