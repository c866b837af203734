"""Errors of the secure-aggregation protocol."""

from __future__ import annotations


class SecAggError(ValueError):
    """A protocol step cannot go on: bad parameters, a message that does not
    verify, or a request an honest party must refuse."""


class ThresholdError(SecAggError):
    """Fewer parties (or shares) than the reconstruction threshold: the sum
    cannot be unmasked, by design. Nothing about any one input is revealed."""


class SessionRefused(SecAggError):
    """An organization refuses a session its policy forbids: fewer participants
    or a lower threshold than its floor, or peers whose keys it cannot verify
    against the roster it pinned. Nothing of its data is sent."""
