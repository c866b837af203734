"""The ClientApp: what an organization does when the coordinator asks.

``@app.train``: check the global adapter's header against this organization's
base model, reduce it to this organization's rank if the job allows
heterogeneous ranks, train the factors the strategy trains, and reply with
the factors it shares (header + tensors + scalar metrics — never a record, a
token id or a per-example output). Factors a strategy keeps local (FedSA-LoRA's
B) stay in this node's Flower ``context.state`` from one round to the next.
``@app.evaluate``: score the global adapter (with the local factors) on the
local test split.

A refused instruction (another base model, another adapter config) raises
UpdateRejected: Flower turns it into an error reply that the coordinator logs
with its reason.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.evaluation import evaluate_examples
from clients.local_data import LocalData, local_data, local_rank
from clients.resident import ResidentModel, get_resident
from clients.trainer import TrainSettings, train_adapter
from protos import codec
from protos.adapter import (
    Adapter,
    LoraSpec,
    layout_for_rank,
    parse_factors,
    select_factors,
    spec_for_rank,
)
from protos.lora_rank import reduce_adapter
from protos.round_config import CONFIG_RECORD, RoundConfig

log = logging.getLogger("silotune.client")

app = ClientApp()

METRICS_RECORD = "metrics"
ORG_RECORD = "organization"
LOCAL_FACTORS_STATE = "silotune.local-factors"


@dataclass
class Instruction:
    cfg: RoundConfig
    spec: LoraSpec            # this organization's own spec (its rank)
    resident: ResidentModel
    adapter: Adapter          # the global, at this organization's rank, with its local factors
    data: LocalData


def _receive(msg: Message, context: Context) -> Instruction:
    cfg = RoundConfig.from_record(msg.content.config_records[CONFIG_RECORD])
    spec = spec_for_rank(cfg.lora, local_rank(context.node_config, cfg))
    resident = get_resident(cfg.model, spec)
    header, global_adapter = codec.decode(msg.content)
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
    adapter.update(_local_factors(context))
    data = local_data(context.node_config, cfg, resident.tokenizer)
    return Instruction(cfg, spec, resident, adapter, data)


def _local_factors(context: Context) -> Adapter:
    record = context.state.array_records.get(LOCAL_FACTORS_STATE)
    return {name: array.numpy() for name, array in record.items()} if record else {}


def _keep_local_factors(context: Context, adapter: Adapter, shared: tuple[str, ...]) -> None:
    local = {name: value for name, value in adapter.items() if name not in select_factors(adapter, shared)}
    if local:
        context.state[LOCAL_FACTORS_STATE] = ArrayRecord(array_dict={k: Array(v) for k, v in local.items()})


def _org_seed(seed: int, server_round: int, org: str) -> int:
    digest = hashlib.sha256(f"{seed}:{server_round}:{org}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@app.train()
def train(msg: Message, context: Context) -> Message:
    ins = _receive(msg, context)
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
        adapter, metrics = train_adapter(ins.resident, ins.adapter, ins.data.train, settings)
    _keep_local_factors(context, adapter, shared)
    log.info("%s round %d: loss %.4f (%d steps, rank %d)", ins.data.org_name, cfg.server_round,
             metrics["train_loss"], int(metrics["train_steps"]), ins.spec.rank)
    content = codec.encode(
        select_factors(adapter, shared),
        kind=codec.Kind.Value("UPDATE"),
        job_id=cfg.job_id,
        server_round=cfg.server_round,
        fingerprint=ins.resident.fingerprint,
        lora=ins.spec,
        num_examples=len(ins.data.train),
        metrics=metrics,
        encoding=codec.encoding_from_name(cfg.update_encoding),
    )
    content[ORG_RECORD] = ConfigRecord({"name": ins.data.org_name})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    ins = _receive(msg, context)
    data = ins.data
    with ins.resident.lock:
        ins.resident.load_adapter(ins.adapter)
        limit = ins.cfg.eval_max_examples
        metrics = evaluate_examples(
            ins.resident,
            data.test[:limit],
            data.test_labels[:limit] if data.test_labels is not None else None,
            data.silo.labels,
        )
    content = RecordDict(
        {METRICS_RECORD: MetricRecord(metrics), ORG_RECORD: ConfigRecord({"name": data.org_name})}
    )
    return Message(content=content, reply_to=msg)
