"""Errors of the secure-aggregation protocol."""

from __future__ import annotations


class SecAggError(ValueError):
    """A protocol step cannot go on: bad parameters, a message that does not
    verify, or a request an honest party must refuse."""


class ThresholdError(SecAggError):
    """Fewer parties (or shares) than the reconstruction threshold: the sum
    cannot be unmasked, by design. Nothing about any one input is revealed."""
