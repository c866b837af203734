"""The cryptographic PRG: a 32-byte seed → a stream of uniform ring elements.

A mask is the keystream of a stream cipher keyed by the seed, read as
little-endian uint32 (or uint64) words and reduced mod 2^k: uniform on
Z_{2^k} whenever the cipher is a PRF, which NumPy's RandomState (what
Flower's SecAgg+ uses, seeded from 32 bits) is not. Two ciphers from
``cryptography`` (OpenSSL):

* ``aes-128-ctr`` (default): AES-NI makes AES the fastest on x86 servers, and
  128-bit AES (10 rounds) ≈ 1.4× AES-256 (14 rounds); a 128-bit key is the
  usual strength for a PRG (the seed's first 16 bytes);
* ``aes-256-ctr``: the whole 32-byte seed as the key;
* ``chacha20``: constant-time in software, for CPUs without AES instructions.

Every seed is fresh per round and per pair (an HKDF output bound to the
session), so the all-zero nonce/counter never repeats under one key.

``apply_masks`` adds ±PRG(seed) for many seeds to one vector in place, one
cache-sized chunk at a time with every stream open together, so the vector
is read and written once per chunk rather than once per mask, and the
memory beyond the vector is one chunk.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from protos.secagg.errors import SecAggError

PRGS = ("aes-128-ctr", "aes-256-ctr", "chacha20")
DEFAULT_PRG = "aes-128-ctr"
SEED_BYTES = 32
#: ring elements per chunk: 64 Ki × 4 bytes = 256 KiB of keystream, about an L2 cache
CHUNK_ELEMENTS = 1 << 16

_ZERO_NONCE = bytes(16)


def keystream(seed: bytes, prg: str = DEFAULT_PRG) -> CipherContext:
    """An encryptor whose output on zero bytes is the seed's keystream."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a PRG seed is {SEED_BYTES} bytes, got {len(seed)}")
    if prg == "aes-128-ctr":
        cipher = Cipher(algorithms.AES(seed[:16]), modes.CTR(_ZERO_NONCE))
    elif prg == "aes-256-ctr":
        cipher = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE))
    elif prg == "chacha20":
        cipher = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None)
    else:
        raise SecAggError(f"unknown PRG {prg!r}; valid: {list(PRGS)}")
    return cipher.encryptor()


def expand(seed: bytes, count: int, dtype: np.dtype | str, ring_bits: int | None = None,
           prg: str = DEFAULT_PRG) -> np.ndarray:
    """The first ``count`` elements of the seed's stream (mod 2^ring_bits if given)."""
    dtype = np.dtype(dtype)
    out = np.frombuffer(bytearray(keystream(seed, prg).update(bytes(count * dtype.itemsize))), dtype=dtype)
    if ring_bits is not None and ring_bits < dtype.itemsize * 8:
        out &= dtype.type((1 << ring_bits) - 1)
    return out


def apply_masks(
    vector: np.ndarray,
    masks: Iterable[tuple[bytes, int]],
    ring_bits: int,
    prg: str = DEFAULT_PRG,
    chunk: int = CHUNK_ELEMENTS,
) -> None:
    """vector += Σ sign · PRG(seed)  (mod 2^ring_bits), in place.

    ``masks``: (seed, sign) pairs, sign +1 or −1. ``vector``: a contiguous
    1-D uint32/uint64 array; element j of every mask is the j-th element of
    its stream, so a mask added by one party is removed exactly by another.
    """
    if vector.ndim != 1 or not vector.flags.c_contiguous or vector.dtype.kind != "u":
        raise SecAggError("masks apply to a contiguous 1-D unsigned vector")
    streams: list[tuple[CipherContext, bool]] = []
    for seed, sign in masks:
        if sign not in (1, -1):
            raise SecAggError(f"mask sign must be +1 or -1, got {sign!r}")
        streams.append((keystream(seed, prg), sign > 0))
    if streams:
        _apply_streams(vector, streams, chunk)
    if ring_bits < vector.dtype.itemsize * 8:
        vector &= vector.dtype.type((1 << ring_bits) - 1)


def _apply_streams(vector: np.ndarray, streams: Sequence[tuple[CipherContext, bool]], chunk: int) -> None:
    itemsize = vector.dtype.itemsize
    zeros = memoryview(bytes(chunk * itemsize))
    # update_into wants room for one cipher block beyond the input
    buffer = bytearray(chunk * itemsize + 32)
    words = np.frombuffer(buffer, dtype=vector.dtype, count=chunk)
    for start in range(0, vector.size, chunk):
        part = vector[start : start + chunk]
        n = part.size
        stream_words = words[:n]
        for encryptor, add in streams:
            encryptor.update_into(zeros[: n * itemsize], buffer)
            if add:
                np.add(part, stream_words, out=part)
            else:
                np.subtract(part, stream_words, out=part)
