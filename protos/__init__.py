"""The contract between an organization and the coordinator.

Everything that crosses an organization's boundary is defined here: the
update header (`silotune/v1/update.proto`), the codec that turns adapter
tensors into Flower records and back, the checks applied to a received
header, and the identity of the base model (fingerprint, adapter layout) that
both sides must agree on. Nothing in this package imports other silotune code.
"""
