"""Identity of a base model: a hash of its weights, independent of file format.

An update trained on another base model (or another revision, or a differently
quantized copy) is meaningless for this job, so every header carries this
fingerprint and the receiver compares it. It hashes the tensors themselves
(names, shapes, float32 values), so the same weights loaded from a GGUF file,
a safetensors folder or the Hub give the same fingerprint.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def fingerprint_state_dict(state_dict: dict[str, Any]) -> str:
    """blake2b-128 over (name, shape, float32 bytes) of every tensor, sorted by name."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if hasattr(tensor, "detach"):  # torch.Tensor, without importing torch here
            array = tensor.detach().to("cpu").float().numpy()
        else:
            array = np.asarray(tensor, dtype=np.float32)
        array = np.ascontiguousarray(array, dtype="<f4")
        digest.update(name.encode())
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(array.tobytes())
    return "blake2b:" + digest.hexdigest()
