"""The ClientApp: Flower's entry point at each organization.

It checks nothing and trains nothing itself: it hands the instruction to the
round work (clients/round_work.py) — on the organization's resident trainer
when the agent started one (its node config names it), else in this process
(simulation, tests, a laptop). Factors a strategy keeps local (FedSA-LoRA's B)
live in this node's Flower ``context.state`` between rounds.

Under secure aggregation a TRAIN message is one of four exchanges
(clients/secure_aggregation.py); its train stage runs the same round work.

A refused instruction (another base model, another adapter config) raises
UpdateRejected: Flower turns it into an error reply that the coordinator logs
with its reason.
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients import round_work, secure_aggregation
from clients.node_config import TRAINER_ACTOR_KEY
from clients.resident_trainer import run_on_resident_trainer

app = ClientApp()


def _run(kind: str, content: RecordDict, context: Context) -> RecordDict:
    if TRAINER_ACTOR_KEY in context.node_config:
        reply, state = run_on_resident_trainer(kind, content, dict(context.node_config), context.state)
        for name in list(state.keys()):
            context.state[name] = state[name]
        return reply
    return round_work.HANDLERS[kind](content, context.node_config, context.state)


def _handle(kind: str, msg: Message, context: Context) -> Message:
    return Message(content=_run(kind, msg.content, context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if secure_aggregation.is_secure(msg.content):  # one of secure aggregation's four exchanges
        reply = secure_aggregation.handle(msg.content, context.state, lambda content: _run("train", content, context),
                                          dict(context.node_config))
        return Message(content=reply, reply_to=msg)
    return _handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle("evaluate", msg, context)
