"""Update encodings: how a float32 adapter tensor is laid out in a Flower Array.

One encoding is one module of this package. It subclasses ``UpdateEncoding``
and decorates the class with ``@ENCODINGS.register(name)``; the registry finds
the module by itself (protos/registry.py), so ``protos/codec.py`` and the run
config's ``update-encoding`` check learn of it without being edited.

The interface (class attributes and classmethods; an encoding holds no state):

* ``name`` — the run-config name; the decorator sets it to the registered name.
* ``wire_id`` — the ``silotune.v1.Encoding`` value a TensorSpec carries. The
  .proto enum is the wire truth: a built-in encoding uses its enum value
  (``pb.INT8``), and tests/test_codec.py checks that the built-in modules and
  the enum correspond one to one. Proto3 enums are open, so an id the enum
  does not list still round-trips; an out-of-tree module may use one.
* ``wire_dtype`` — the numpy dtype of the Array's values.
* ``encode(values)`` — float32 ndarray → ``(wire ndarray, scale)``. ``scale`` is
  the one number per tensor that TensorSpec carries beside the values (its
  ``scale`` field); 0.0 when unused, which proto3 does not serialize.
* ``decode(wire, spec)`` — the wire values (already checked to be of
  ``wire_dtype`` and ``wire_shape(spec.shape)``) → float32 ndarray of the spec's
  shape. It checks its own metadata and raises ``UpdateRejected`` on bad values
  (int8: a scale that is not finite and positive is ``NON_FINITE``). It may
  return ``wire`` itself, a read-only view over the received bytes.
* ``max_abs_error(values)`` — a bound on ``|decode(encode(values)) - values|``
  over the tensor, for finite values (``inf`` where the encoding cannot hold
  them, e.g. fp16 beyond 65504). The tests hold each encoding to it.
* ``wire_shape(shape)`` — the Array's shape for a tensor of logical ``shape``;
  the same unless the encoding packs values (two 4-bit values a byte).

``encode``, ``decode`` and ``max_abs_error`` are abstract: the registry refuses
a class that lacks one. Dispatch by wire id goes through ``by_wire_id()``, a
dict built once and rebuilt only when the registry's members change; building
it refuses two encodings on one wire id, the reserved id 0, and a wire dtype
that is not a numpy dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping

import numpy as np

from protos.registry import Registry, where

ENCODINGS: Registry[type["UpdateEncoding"]] = Registry("encoding", "protos.encodings", name_attr="name")

#: TensorSpec.encoding is a proto3 enum field: an int32, 0 meaning unset
_WIRE_ID_MAX = 2**31 - 1


class UpdateEncoding(ABC):
    """Base of every encoding; see the module docstring for the contract."""

    name: ClassVar[str]
    wire_id: ClassVar[int]
    wire_dtype: ClassVar[np.dtype]

    @classmethod
    @abstractmethod
    def encode(cls, values: np.ndarray) -> tuple[np.ndarray, float]:
        """float32 values → (wire values, TensorSpec.scale or 0.0)."""

    @classmethod
    @abstractmethod
    def decode(cls, wire: np.ndarray, spec) -> np.ndarray:  # type: ignore[no-untyped-def]  # spec: pb.TensorSpec
        """Wire values of the checked dtype and shape → float32; UpdateRejected on bad metadata."""

    @classmethod
    @abstractmethod
    def max_abs_error(cls, values: np.ndarray) -> float:
        """A bound on |decode(encode(values)) - values| for finite values."""

    @classmethod
    def wire_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape




def by_wire_id() -> Mapping[int, type[UpdateEncoding]]:
    """Every registered encoding by its wire id; ValueError if two share one.

    The codec calls this once per encode/decode, not per tensor: comparing the
    registry's few members with those the table was built from is small next
    to a decode, and a module registered later (or removed by a test) is seen.
    """
    return ENCODINGS.derived(_by_wire_id_table)


def _by_wire_id_table(members: tuple) -> dict:
    table: dict = {}
    for name, encoding in members:
        wire_id = getattr(encoding, "wire_id", None)
        if not isinstance(wire_id, int) or not 0 < wire_id <= _WIRE_ID_MAX:
            raise ValueError(f"encoding {name!r} ({where(encoding)}): wire id {wire_id!r} is not in "
                             f"1..{_WIRE_ID_MAX} (0 is ENCODING_UNSPECIFIED)")
        if not isinstance(getattr(encoding, "wire_dtype", None), np.dtype):
            raise ValueError(f"encoding {name!r} ({where(encoding)}): wire_dtype must be a numpy dtype, "
                             f"got {getattr(encoding, 'wire_dtype', None)!r}")
        other = table.get(wire_id)
        if other is not None:
            raise ValueError(f"encodings {other.name!r} ({where(other)}) and {name!r} ({where(encoding)}) "
                             f"share wire id {wire_id}: each needs its own Encoding value")
        table[wire_id] = encoding
    return table


def get(name: str) -> type[UpdateEncoding]:
    """The encoding called ``name`` (any case); ValueError listing the valid names."""
    by_wire_id()  # a broken registry (shared wire id) fails here, not mid-round
    return ENCODINGS.get(name)


def encoding_names() -> list[str]:
    """The valid ``update-encoding`` values, in wire-id order (fp32, fp16, int8, ...)."""
    return [encoding.name for _, encoding in sorted(by_wire_id().items())]


