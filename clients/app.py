"""The ClientApp: Flower's entry point at each organization.

It checks nothing and trains nothing itself: it hands the instruction to the
round work (clients/round_work.py) — on the organization's resident trainer
when the agent started one (its node config names it), else in this process
(simulation, tests, a laptop). Factors a strategy keeps local (FedSA-LoRA's B)
live in this node's Flower ``context.state`` between rounds.

Under secure aggregation a TRAIN message is one of four exchanges
(clients/secure_aggregation.py); its train stage runs the same round work.

A refused instruction (another base model, another adapter config, a policy
rule) raises UpdateRejected: Flower turns it into an error reply that the
coordinator logs with its reason. Any other failure leaves as its type only
(``InstructionFailed``): Flower sends an exception's text verbatim, and a
text may quote a record (a silo error naming a row's content); the whole
error stays in the organization's own log.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients import round_work, secure_aggregation
from clients.node_config import TRAINER_ACTOR_KEY
from clients.resident_trainer import run_on_resident_trainer

from protos.errors import UpdateRejected
from protos.secagg.errors import SecAggError

log = logging.getLogger("silotune.client")

app = ClientApp()

#: failures whose text is ours and holds no data: reason codes, rule names, shapes, fingerprints
SAFE_TO_SEND = (UpdateRejected, SecAggError)


class InstructionFailed(RuntimeError):
    """An instruction failed here; the coordinator learns the error's type, not its text."""


def _nothing_of_the_data_in_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except SAFE_TO_SEND:
            raise
        except Exception as err:
            log.error("instruction failed: %s: %s", type(err).__name__, err, exc_info=err)
            raise InstructionFailed(f"{type(err).__name__} (details in the organization's log)") from None
    return guarded


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
@_nothing_of_the_data_in_errors
def train(msg: Message, context: Context) -> Message:
    if secure_aggregation.is_secure(msg.content):  # one of secure aggregation's four exchanges
        reply = secure_aggregation.handle(msg.content, context.state, lambda content: _run("train", content, context),
                                          dict(context.node_config))
        return Message(content=reply, reply_to=msg)
    return _handle("train", msg, context)


@app.evaluate()
@_nothing_of_the_data_in_errors
def evaluate(msg: Message, context: Context) -> Message:
    return _handle("evaluate", msg, context)
