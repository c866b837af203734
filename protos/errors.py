"""Named reasons for refusing what arrived from the network.

Every input from the network is checked; a bad one is refused with one of
these reasons (for the round log) and never stops the round.
"""

from __future__ import annotations

from enum import Enum


class RejectReason(str, Enum):
    MALFORMED = "malformed"                      # records missing / header not parseable
    PROTOCOL_VERSION = "protocol_version"
    WRONG_KIND = "wrong_kind"
    WRONG_JOB = "wrong_job"
    WRONG_ROUND = "wrong_round"
    BASE_MODEL_MISMATCH = "base_model_mismatch"
    ADAPTER_CONFIG_MISMATCH = "adapter_config_mismatch"
    TENSOR_NAMES = "tensor_names"
    TENSOR_SHAPE = "tensor_shape"
    TENSOR_DTYPE = "tensor_dtype"
    NON_FINITE = "non_finite"
    NORM_BOUND = "norm_bound"
    NUM_EXAMPLES = "num_examples"
    CLIENT_ERROR = "client_error"                # the ClientApp replied with an error
    DUPLICATE = "duplicate"                      # a node's second reply in a round; an update already accepted
    OVERSIZED = "oversized"                      # more bytes than max-update-bytes, refused before decoding
    STRATEGY_REFUSED = "strategy_refused"        # e.g. more updates than a robust strategy holds
    SECURE_AGGREGATION = "secure_aggregation"    # a secure-aggregation message that does not verify
    POLICY_VIOLATION = "policy_violation"        # an organization's policy refuses the instruction (clients/policy.py)
    METRIC_VALUE = "metric_value"                # a metric that is not a scalar, or outside its bounds (loss < 0, accuracy > 1)


class UpdateRejected(ValueError):
    """A received message that must not be applied, with a named reason."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
