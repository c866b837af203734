"""How the global adapter travels down to the organizations: the job's ``global-encoding``.

Every round the coordinator pushes the global adapter twice to each sampled
organization (to train from, then to evaluate), so with compact updates the
downlink is most of a job's bytes. A lossy encoding (fp16, int8, q4) cuts it,
but then what an organization decodes is not what the coordinator holds. So the
coordinator *keeps its global on the encoding's grid*: after every aggregation
(and for the starting adapter) it replaces the global by what a receiver would
decode from it. Organizations then train from, and evaluate, exactly the
adapter the coordinator holds, checkpoints and exports — the specialist scored
in the report is the one in the folder, bit for bit. Each round adds one
quantization of the global (within the encoding's error bound); the aggregate
of the organizations' updates is computed as before, in float32.

"What a receiver decodes" must be a fixed point: encoding the held adapter must
give back the same values, or the held and the received copies would drift
apart by a rounding. fp16 and int8 reach it in one round trip; q4 may need two
or three where a block's float16 scale is subnormal (values near 1e-6), because
its scale rounds up and the largest code can then drop below 7. ``on_grid``
iterates to the fixed point and checks it.

With the job setting ``global-delta`` (``Downlink``) the global is not kept on
the grid: it moves each round by the quantized difference from the previous
global, which is what goes down to organizations that proved holding that one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protos import codec, global_delta
from protos.adapter import Adapter, LoraSpec
from protos.silotune.v1 import update_pb2 as pb

#: round trips allowed to reach the fixed point (q4 needed at most 3 over adapters from 1e-9 to 1e2)
MAX_ROUND_TRIPS = 8


class DownlinkError(RuntimeError):
    """An encoding that does not settle on a fixed point: the held and sent globals would differ."""


def _round_trip(adapter: Adapter, encoding: int) -> Adapter:
    """The adapter as an organization decodes it from a GLOBAL message in ``encoding``."""
    return _decode_tensors(codec.encode_tensors(adapter, encoding))


def _decode_tensors(encoded: codec.EncodedTensors) -> Adapter:
    """Encoded tensors as an organization decodes them from a GLOBAL message."""
    content = codec.encode(None, kind=codec.Kind.Value("GLOBAL"), job_id="downlink", server_round=0,
                           fingerprint="", lora=LoraSpec(), tensors=encoded)
    return codec.decode(content)[1]


def _same_values(decoded: Adapter, adapter: Adapter) -> bool:
    """Every tensor of ``adapter`` equal, as float32, to ``decoded``'s."""
    return all(np.array_equal(decoded[name], np.asarray(adapter[name], dtype=np.float32)) for name in adapter)


def on_grid(adapter: Adapter, name: str) -> Adapter:
    """``adapter`` replaced by the values an organization decodes from it in the encoding
    called ``name``, such that encoding those again decodes to themselves (float32, same
    names and shapes). fp32 is lossless: the adapter comes back as it is."""
    encoding = codec.encoding_from_name(name)
    if encoding == pb.FP32:
        return adapter
    held = _round_trip(adapter, encoding)
    for _ in range(MAX_ROUND_TRIPS):
        again = _round_trip(held, encoding)
        if _same_values(again, held):
            return held
        held = again
    raise DownlinkError(f"the global adapter did not settle on encoding {name}'s grid "
                        f"in {MAX_ROUND_TRIPS} round trips")


# ---- global-delta: the global sent as a difference from one the organization holds ----------

@dataclass(frozen=True)
class Push:
    """One GLOBAL message's tensors and digests, shared by every node it goes to."""

    tensors: codec.EncodedTensors
    global_digest: str   # "" when global-delta is off
    base_digest: str     # "": the tensors are the global itself


class Downlink:
    """What the coordinator sends each node, and what it holds to do so.

    ``global-delta`` off: one full message in ``global-encoding`` for all, the global
    kept on that encoding's grid (``on_grid``). On: the coordinator keeps its current
    global and the previous one, each with its digest, and per node the digest that
    node last proved (``prove``). A node that proved the current global gets the
    digests only; one that proved the previous gets ``enc(current − previous)``, the
    same bytes that made the current global (``advance``); any other a full message.

    Exactness: ``advance`` makes the new global ``B + dec(enc(A − B))`` in float32 (B
    the held global, A the aggregate) — what a receiver rebuilds from those bytes,
    bit for bit, with no fixed point needed. A full message goes in
    ``global-encoding`` only while the held global is a fixed point of it (the
    starting adapter, put on the grid by ``on_grid``), else in fp32, which is
    lossless; either way the receiver decodes exactly the held global, and checks
    its digest.
    """

    def __init__(self, encoding_name: str, delta: bool) -> None:
        self.encoding_name = encoding_name
        self.encoding = codec.encoding_from_name(encoding_name)
        self.delta = delta
        self.current: Adapter | None = None
        self.digest = ""
        self._full: codec.EncodedTensors | None = None
        self.previous_digest = ""
        self._from_previous: codec.EncodedTensors | None = None   # enc(current − previous)
        self.proved: dict[int, str] = {}   # node id -> digest of the global it last proved

    def hold(self, adapter: Adapter) -> Adapter:
        """Start from ``adapter`` (a fresh or a resumed job): no delta until a node proves it."""
        self.previous_digest, self._from_previous = "", None
        self._set_current(adapter)
        return adapter

    def advance(self, aggregate: Adapter) -> Adapter:
        """The new global from the strategy's ``aggregate``, as organizations will decode it."""
        if not self.delta:
            return self.hold(on_grid(aggregate, self.encoding_name))
        assert self.current is not None, "hold() the starting global first"
        base, base_digest = self.current, self.digest
        encoded = codec.encode_tensors(global_delta.difference(aggregate, base), self.encoding)
        new = global_delta.apply_delta(base, _decode_tensors(encoded))
        self._set_current(new)
        self.previous_digest, self._from_previous = base_digest, encoded
        return new

    def prove(self, node_id: int, digest: str) -> None:
        """A reply of ``node_id`` says it holds the global ``digest`` ("": nothing, e.g. its instruction failed)."""
        if digest:
            self.proved[node_id] = digest
        else:
            self.proved.pop(node_id, None)

    def pushes(self, nodes: list[int], delta: bool = True) -> list[tuple[Push, list[int]]]:
        """The messages for ``nodes``, each with the nodes it goes to (at most three kinds).
        ``delta=False``: a full message for all (a secure-aggregation train stage, one content for all)."""
        assert self._full is not None, "hold() the starting global first"
        if not self.delta:
            return [(Push(self._full, "", ""), list(nodes))] if nodes else []
        groups: dict[str, list[int]] = {}
        for node in nodes:
            held = self.proved.get(node, "") if delta else ""
            kind = "same" if held == self.digest else "previous" if held and held == self.previous_digest else "full"
            groups.setdefault(kind, []).append(node)
        made = {"same": lambda: Push(codec.EncodedTensors((), {}), self.digest, self.digest),
                "previous": lambda: Push(self._from_previous, self.digest, self.previous_digest),
                "full": lambda: Push(self._full, self.digest, "")}
        return [(made[kind](), group) for kind, group in groups.items()]

    def _set_current(self, adapter: Adapter) -> None:
        self.current = adapter
        self.digest = global_delta.digest(adapter) if self.delta else ""
        encoded = codec.encode_tensors(adapter, self.encoding)
        if self.delta and self.encoding != pb.FP32 and not _same_values(_decode_tensors(encoded), adapter):
            encoded = codec.encode_tensors(adapter, pb.FP32)   # off the grid: only fp32 sends it exactly
        self._full = encoded

