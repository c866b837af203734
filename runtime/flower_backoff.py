"""Flower's wait for message objects that have not arrived yet, shortened where silotune runs Flower.

Flower 1.41 hands a message on before its objects (the adapter's arrays) are
stored: the SuperNode creates the ClientApp's task, then copies the objects in
from the SuperLink; a SuperLink lists a reply while the SuperNode is still
pushing its objects. Whoever pulls early gets `ObjectUnavailableError` and
`flwr.supercore.inflatable.inflatable_utils.pull_objects` retries after 1 s,
then 2 s, 4 s ... up to 10 s (`PULL_INITIAL_BACKOFF`, `PULL_BACKOFF_CAP`,
constants, not options). A ClientApp process that starts in seconds rarely
noticed; a warm runner (clients/app_launcher.py) pulls within milliseconds of
the task and then waited 1 s + 2 s for objects that arrived a few ms later.

`shorten_object_backoff` rebinds one Flower module's reference to its pull
function to the same function with a shorter first retry and cap, in this
process only. The cost is a few more PullObject requests while an object is
still on its way: against the SuperNode's local store for a ClientApp, and
against the SuperLink for a SuperNode (a few a second per waiting message).
"""

from __future__ import annotations

import functools
import inspect
from types import ModuleType


class FlowerPacingUnsupported(RuntimeError):
    """The installed Flower does not wait where silotune expects it to (a Flower upgrade)."""


def shorten_object_backoff(module: ModuleType, name: str, initial: float, cap: float) -> None:
    """`module.name` (Flower's pull function as that module calls it) retries first after `initial`
    seconds, doubling up to `cap`; FlowerPacingUnsupported if it takes no such arguments."""
    if not 0 < initial <= cap:
        raise ValueError(f"backoff: need 0 < initial <= cap, got initial={initial}, cap={cap}")
    function = getattr(module, name, None)
    if isinstance(function, functools.partial):  # already shortened: shorten the original instead
        function = function.func
    try:
        parameters = inspect.signature(function).parameters if callable(function) else {}
    except (TypeError, ValueError):
        parameters = {}
    if not {"initial_backoff", "backoff_cap"} <= set(parameters):
        raise FlowerPacingUnsupported(f"{module.__name__}.{name} is not Flower 1.41's pull function with "
                                      "initial_backoff/backoff_cap: check the installed Flower")
    setattr(module, name, functools.partial(function, initial_backoff=initial, backoff_cap=cap))
