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
"""

from __future__ import annotations

import numpy as np

from protos import codec
from protos.adapter import Adapter, LoraSpec
from protos.silotune.v1 import update_pb2 as pb

#: round trips allowed to reach the fixed point (q4 needed at most 3 over adapters from 1e-9 to 1e2)
MAX_ROUND_TRIPS = 8


class DownlinkError(RuntimeError):
    """An encoding that does not settle on a fixed point: the held and sent globals would differ."""


def _round_trip(adapter: Adapter, encoding: int) -> Adapter:
    """The adapter as an organization decodes it from a GLOBAL message in ``encoding``."""
    content = codec.encode(adapter, kind=codec.Kind.Value("GLOBAL"), job_id="downlink", server_round=0,
                           fingerprint="", lora=LoraSpec(), encoding=encoding)
    return codec.decode(content)[1]


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
        if all(np.array_equal(again[name], held[name]) for name in held):
            return held
        held = again
    raise DownlinkError(f"the global adapter did not settle on encoding {name}'s grid "
                        f"in {MAX_ROUND_TRIPS} round trips")
