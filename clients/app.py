"""The ClientApp: what an organization does when the coordinator asks.

``@app.train``: check the global adapter's header against this organization's
base model, train locally, reply with the encoded adapter (header + tensors +
scalar metrics — never a record, a token id or a per-example output).
``@app.evaluate``: score the global adapter on the local test split.

A refused instruction (another base model, another adapter config) raises
UpdateRejected: Flower turns it into an error reply that the coordinator logs
with its reason.
"""

from __future__ import annotations

import hashlib
import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.evaluation import evaluate_examples
from clients.local_data import local_data
from clients.resident import ResidentModel, get_resident
from clients.trainer import TrainSettings, train_adapter
from protos import codec
from protos.round_config import CONFIG_RECORD, RoundConfig

log = logging.getLogger("silotune.client")

app = ClientApp()

METRICS_RECORD = "metrics"
ORG_RECORD = "organization"


def _receive(msg: Message) -> tuple[RoundConfig, ResidentModel, dict]:
    cfg = RoundConfig.from_record(msg.content.config_records[CONFIG_RECORD])
    resident = get_resident(cfg.model, cfg.lora)
    header, global_adapter = codec.decode(msg.content)
    codec.check_header(
        header,
        codec.Expectation(
            kind=codec.Kind.Value("GLOBAL"),
            job_id=cfg.job_id,
            server_round=cfg.server_round,
            fingerprint=resident.fingerprint,
            lora=cfg.lora,
            layout=resident.layout,
        ),
    )
    codec.check_values(global_adapter)
    return cfg, resident, global_adapter


def _org_seed(seed: int, server_round: int, org: str) -> int:
    digest = hashlib.sha256(f"{seed}:{server_round}:{org}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, resident, global_adapter = _receive(msg)
    with resident.lock:
        data = local_data(context.node_config, cfg, resident.tokenizer)
        settings = TrainSettings(
            local_steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            seed=_org_seed(cfg.seed, cfg.server_round, data.org_name),
        )
        adapter, metrics = train_adapter(resident, global_adapter, data.train, settings)
    log.info("%s round %d: loss %.4f (%d steps)", data.org_name, cfg.server_round,
             metrics["train_loss"], int(metrics["train_steps"]))
    content = codec.encode(
        adapter,
        kind=codec.Kind.Value("UPDATE"),
        job_id=cfg.job_id,
        server_round=cfg.server_round,
        fingerprint=resident.fingerprint,
        lora=cfg.lora,
        num_examples=len(data.train),
        metrics=metrics,
        encoding=codec.encoding_from_name(cfg.update_encoding),
    )
    content[ORG_RECORD] = ConfigRecord({"name": data.org_name})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, resident, global_adapter = _receive(msg)
    with resident.lock:
        data = local_data(context.node_config, cfg, resident.tokenizer)
        resident.load_adapter(global_adapter)
        limit = cfg.eval_max_examples
        metrics = evaluate_examples(
            resident,
            data.test[:limit],
            data.test_labels[:limit] if data.test_labels is not None else None,
            data.silo.labels,
        )
    content = RecordDict(
        {METRICS_RECORD: MetricRecord(metrics), ORG_RECORD: ConfigRecord({"name": data.org_name})}
    )
    return Message(content=content, reply_to=msg)
