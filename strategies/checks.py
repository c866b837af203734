"""Validation shared by the strategies: constructor parameters and updates.

Parameters come from run configs and scenario files (TOML, JSON, CLI), so a
bad value must fail at construction with a ValueError that names the
parameter and its valid range, never later inside a round.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from protos.adapter import Adapter


def _bad(owner: str, name: str, rule: str, value: Any) -> ValueError:
    return ValueError(f"{owner}: parameter {name!r} must be {rule}, got {value!r}")


def check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number within [low, high] (either end optionally open)."""
    lo = "(" if low_open else "["
    hi = ")" if high_open or high is None else "]"
    rule = f"a number in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _bad(owner, name, rule, value)
    out = float(value)
    if not math.isfinite(out):
        raise _bad(owner, name, rule, value)
    if low is not None and (out < low or (low_open and out == low)):
        raise _bad(owner, name, rule, value)
    if high is not None and (out > high or (high_open and out == high)):
        raise _bad(owner, name, rule, value)
    return out


def check_int(owner: str, name: str, value: Any, *, low: int, high: int | None = None) -> int:
    """An integer within [low, high]; 3.0 is accepted as 3, 3.5 and True are not."""
    rule = f"an integer in [{low}, {'inf)' if high is None else f'{high}]'}"
    if isinstance(value, bool):
        raise _bad(owner, name, rule, value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise _bad(owner, name, rule, value)
    out = int(value)
    if out < low or (high is not None and out > high):
        raise _bad(owner, name, rule, value)
    return out


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _bad(owner, name, "true or false", value)
    return bool(value)


def check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _bad(owner, name, f"one of {list(choices)}", value)
    return value


def check_num_examples(num_examples: int) -> float:
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    return float(num_examples)


def check_same_layout(update: Adapter, reference: Adapter) -> None:
    """Same tensor names and shapes as the reference (the round's global)."""
    if update.keys() != reference.keys():
        missing = sorted(reference.keys() - update.keys())[:3]
        extra = sorted(update.keys() - reference.keys())[:3]
        raise ValueError(f"update tensors differ from the global adapter's (missing {missing}, unexpected {extra})")
    for name, value in update.items():
        if value.shape != reference[name].shape:
            raise ValueError(f"update tensor {name!r} has shape {value.shape}, the global has {reference[name].shape}")


def check_state_layout(state: dict[str, np.ndarray], global_adapter: Adapter, what: str) -> None:
    """Restored optimizer state must match the adapter it will step."""
    if state.keys() != global_adapter.keys() or any(state[k].shape != global_adapter[k].shape for k in state):
        raise ValueError(f"the saved {what} state does not match the global adapter's tensors")
