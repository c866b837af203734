"""What every tracker shares: a round's summary as named scalars, and the observer around them.

Names are paths of tag-safe parts (``eval/bank-a/accuracy``). Organization names
and metric names came from the network (printable, at most 128 characters, but
anything else: ``/``, spaces, markup, any script), so each part goes through
``TagNames``: a name that is already tag-safe is kept, any other is made tag-safe
and gets a short hash of the original, and the tracker records what each such tag
stands for.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from typing import Any

log = logging.getLogger("silotune.server")

#: what a tag part may hold: TensorBoard, MLflow and a file name all take these
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
#: the readable part of a tag made from an unsafe name; the hash follows it
MAX_TAG_PART = 48
#: tags a name may not turn into (``eval/overall/...`` is the mean over organizations)
RESERVED = frozenset({"overall"})


class TagNames:
    """Name → tag part, injective: two names never share a tag.

    ``changed`` holds the tags that differ from their name (tag → name): what a
    reader needs to find an organization whose name was not tag-safe."""

    def __init__(self) -> None:
        self._tags: dict[str, str] = {}
        self._names: dict[str, str] = {}
        self.changed: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        tag = self._tags.get(name)
        if tag is None:
            tag = self._new_tag(name)
            self._tags[name], self._names[tag] = tag, name
            if tag != name:
                self.changed[tag] = name
        return tag

    def _new_tag(self, name: str) -> str:
        safe = _UNSAFE.sub("_", name).lstrip(".")   # no '.', '..' or hidden-file parts
        if name and safe == name and len(name) <= MAX_TAG_PART and name not in RESERVED and name not in self._names:
            return name
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        # 8 hex digits tell names apart; a longer hash only if a name was chosen to collide
        for width in (8, 16, 64):
            tag = f"{safe[:MAX_TAG_PART]}-{digest[:width]}"
            if tag not in self._names:
                return tag
        raise AssertionError("sha256 collision")   # pragma: no cover


def round_scalars(summary: dict[str, Any], tag: TagNames) -> dict[str, float]:
    """Every number of a round's summary (server/job.py), by scalar name:

    * ``train/loss``, ``train/seconds``, ``eval/seconds``;
    * ``eval/<org>/<metric>`` for each organization's metrics, ``eval/overall/<metric>``
      for the example-weighted means;
    * ``round/<key>``: the round's counts (``sampled``, ``attempts``) and the length of
      its lists (``accepted``, ``rejected``, ``timed_out``, ``eval_rejected``, ...), and
      any other number a summary carries (byte counts, say);
    * ``<key>/<field>`` for the numbers of a nested record (``privacy/epsilon``).

    Values that are not finite (round 0 has no training loss) are left out."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if key in ("round", "max_weight"):   # the step itself; a setting, not a measurement
            continue
        if key == "eval":
            for org, metrics in value.items():
                _put_all(out, f"eval/{tag(str(org))}", metrics, tag)
        elif key == "eval_overall":
            _put_all(out, "eval/overall", value, tag)
        elif key == "train_loss":
            _put(out, "train/loss", value)
        elif key == "train_seconds":
            _put(out, "train/seconds", value)
        elif key == "eval_seconds":
            _put(out, "eval/seconds", value)
        elif isinstance(value, dict):
            _put_all(out, tag(key), value, tag)
        elif isinstance(value, (list, tuple)):
            _put(out, f"round/{tag(key)}", len(value))
        else:
            _put(out, f"round/{tag(key)}", value)
    return out


def _put_all(out: dict[str, float], prefix: str, values: Any, tag: TagNames) -> None:
    if isinstance(values, dict):
        for name, value in values.items():
            _put(out, f"{prefix}/{tag(str(name))}", value)


def _put(out: dict[str, float], name: str, value: Any) -> None:
    if isinstance(value, (bool, str)) or value is None:
        return
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return
    if math.isfinite(number):
        out[name] = number


class Tracker:
    """A RoundObserver (server/job.py) that logs each finished round's scalars to a tool;
    a subclass says how (``log_round``) and how its run ends (``finish``).

    A tracker is a view of the job: its store being full, locked or gone is logged and
    the rounds go on."""

    #: the tool's name, for log lines
    tool = "a tracker"

    def __init__(self) -> None:
        self.names = TagNames()
        self._failures = 0

    def round_started(self, server_round: int, sampled: int) -> None:
        pass   # the round's counts arrive with its summary

    def reply(self, server_round: int, org: str, accepted: bool, detail: str) -> None:
        pass

    def round_finished(self, server_round: int, summary: dict[str, Any]) -> None:
        try:
            self.log_round(server_round, round_scalars(summary, self.names))
        except Exception as error:
            self._failures += 1
            log.warning("could not log round %d to %s: %s", server_round, self.tool, error,
                        exc_info=self._failures == 1)

    def close(self, error: BaseException | None = None) -> None:
        """The job's rounds are over: ``error`` is what ended them, None when they all ran."""
        try:
            self.finish(error)
        except Exception:
            log.warning("could not close %s", self.tool, exc_info=True)

    def log_round(self, server_round: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, error: BaseException | None) -> None:
        raise NotImplementedError
