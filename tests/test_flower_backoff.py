"""Flower's retry for message objects not stored yet, shortened (runtime/flower_backoff.py) in the
ClientApp processes and the paced SuperNode: only Flower's pull functions, only with their arguments."""

from __future__ import annotations

import types

import pytest

import flwr.supernode.runtime.run_clientapp as run_clientapp
import flwr.supernode.start_client_internal as supernode_loop
from runtime.flower_backoff import FlowerPacingUnsupported, shorten_object_backoff


def pull(object_ids, *, initial_backoff=1.0, backoff_cap=10.0):  # type: ignore[no-untyped-def]
    return initial_backoff, backoff_cap


def test_the_pull_function_is_rebound_with_the_shorter_backoff_once() -> None:
    module = types.ModuleType("fake")
    module.pull = pull  # type: ignore[attr-defined]
    shorten_object_backoff(module, "pull", 0.02, 0.2)
    assert module.pull([]) == (0.02, 0.2)
    shorten_object_backoff(module, "pull", 0.05, 1.0)  # again: rebinds the original, not a wrapper of a wrapper
    assert module.pull.func is pull and module.pull([]) == (0.05, 1.0)


def test_what_is_not_flowers_pull_function_is_refused() -> None:
    module = types.ModuleType("fake")
    module.pull = lambda object_ids: None  # type: ignore[attr-defined]
    with pytest.raises(FlowerPacingUnsupported, match="fake.pull is not Flower 1.41's pull function"):
        shorten_object_backoff(module, "pull", 0.02, 0.2)
    with pytest.raises(FlowerPacingUnsupported):
        shorten_object_backoff(module, "missing", 0.02, 0.2)
    with pytest.raises(ValueError, match="0 < initial <= cap"):
        shorten_object_backoff(module, "pull", 0.5, 0.2)


@pytest.mark.parametrize("module, name, caller", [
    (run_clientapp, "pull_and_inflate_object_from_tree", run_clientapp.pull_task_input),
    (supernode_loop, "pull_objects", supernode_loop._pull_and_store_message),
])
def test_the_installed_flower_pulls_through_the_rebound_name(module, name, caller,  # type: ignore[no-untyped-def]
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    shorten_object_backoff(module, name, 0.02, 0.2)
    assert getattr(module, name).keywords == {"initial_backoff": 0.02, "backoff_cap": 0.2}
    # the Flower function that pulls looks the name up in its module at call time, so it gets ours
    assert name in caller.__code__.co_names and caller.__globals__ is vars(module)
