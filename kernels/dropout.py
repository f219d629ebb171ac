"""LoRA dropout masks that are a pure function of what identifies each element (torch only).

A mask drawn from a global generator depends on the batch layout: on which clients share a
forward pass, in which order the rows run, how they are split into micro-batches. These masks do
not. Element ``(i, t, j)`` of a layer's input (batch row ``i``, token ``t``, feature ``j``) is kept
when a 32-bit counter-based hash of ``(key_i, layer, t, j)`` is at least ``P · 2³²``, where the row
key ``key_i`` hashes what identifies the row's example: its client's sampler seed, the round, the
local step and the example's place in that client's step (:func:`row_keys`; a row of a several-row
example adds its place in the example: :func:`subrow_keys`). Kept entries are scaled by
``1 / (1 − P)`` (inverted dropout), so the expectation is the input.

The hash is ``lowbias32`` (a bijection of ``[0, 2³²)``), chained ``h ← mix(h ⊕ spread(v))`` over
the values, ``spread(v) = mix(v ⊕ salt)``: xoring a small number in as is would let two states that
differ in a few low bits alias (state ``h`` with token ``t`` hashing as state ``h ⊕ 1`` with token
``t ⊕ 1``, so one row's tokens would carry another row's masks, or a token's a permutation of another
token's); spread, the numbers differ in about half their bits and such states draw unrelated masks.
The keys are hashed in int64 ops whose products never exceed 2⁴⁸ (:func:`mix32`); the elements,
which are many, in int32 (:func:`_mix32_i32`: the same bits, 4–6 times faster on a CPU), whose
products wrap modulo 2³² as two's-complement hardware multiplies do (AVX2's ``vpmulld``, CUDA's
``mul.lo``). :func:`mix32_reference` and :func:`dropout_mask_reference` loop over Python integers,
for the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B   # lowbias32's multipliers (Wellons' hash prospector)
_ROW_SALT, _LAYER_SALT, _VALUE_SALT = 0x5EED5EED, 0x9E3779B9, 0x2545F491
#: Elements of a mask hashed at once (int64 temporaries of 128 MiB each).
CHUNK = 1 << 24


def _mul32(h, c: int):
    """``h · c mod 2³²`` for ``0 ≤ h < 2³²``, as two 16-bit halves of ``c`` (products below 2⁴⁸)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix32(h):
    """``lowbias32`` of ``h`` (an int64 tensor or a Python int, each value in ``[0, 2³²)``)."""
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 15)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def _signed(c: int) -> int:
    """The int32 whose bits are the 32-bit unsigned ``c``."""
    return c - (1 << 32) if c >= 1 << 31 else c


_C1_I32, _C2_I32 = _signed(_C1), _signed(_C2)


def _as_i32(h: Tensor) -> Tensor:
    """An int64 tensor of 32-bit values as int32 holding the same bits."""
    return (h - ((h >> 31) << 32)).to(torch.int32)


def _mix32_i32(h: Tensor) -> Tensor:
    """:func:`mix32` of an int32 tensor holding 32-bit values as their two's-complement bits: the
    products wrap modulo 2³², and each right shift is made logical by masking the sign's copies."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _C1_I32
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _C2_I32
    return h ^ ((h >> 16) & 0xFFFF)


def _spread(v):
    """``mix(v ⊕ salt)`` of a number (its low 32 bits) before it is xored into a hash state."""
    return mix32((v & M32) ^ _VALUE_SALT)


def _chain(h, *values):
    for v in values:
        h = mix32(h ^ _spread(v))
    return h


def row_keys(seeds: Tensor, rounds: Tensor, step: int, examples: Tensor) -> Tensor:
    """``(N,)`` int64 keys in ``[0, 2³²)`` of rows identified by their client's sampler ``seeds``
    (any int64: both halves count), ``rounds``, the local ``step`` and ``examples`` (each row's place
    among its client's examples of the step), all ``(N,)`` int64 but ``step``."""
    h = mix32((seeds & M32) ^ _ROW_SALT)
    return _chain(h, (seeds >> 32) & M32, rounds, step, examples)


def subrow_keys(keys: Tensor, rows_per_example: int) -> Tensor:
    """``(N·r,)``: the keys of the ``r`` adjacent model rows of each example (``keys`` itself for
    ``r = 1``)."""
    if rows_per_example == 1:
        return keys
    sub = torch.arange(rows_per_example, device=keys.device).repeat(keys.numel())
    return _chain(keys.repeat_interleave(rows_per_example), sub)


def dropout_mask(keys: Tensor, layer: int, tokens: int, features: int, p: float) -> Tensor:
    """``(N, T, d)`` bool: which input elements layer ``layer`` keeps for rows of ``keys`` (``(N,)``),
    each with probability ``1 − p`` (up to ``2⁻³²``). The elements are hashed :data:`CHUNK` at a time,
    so the int64 temporaries stay a few hundred MiB however large the pass."""
    dev = keys.device
    c = mix32(keys.long() ^ mix32((layer & M32) ^ _LAYER_SALT))                     # (N,)
    c = mix32(c.unsqueeze(1) ^ _spread(torch.arange(tokens, device=dev))).reshape(-1, 1)  # (N·T, 1)
    c, j = _as_i32(c), _as_i32(_spread(torch.arange(features, device=dev)))      # the same bits
    # unsigned h ≥ P·2³² as signed int32s: both sides shifted by 2³¹ (the sign bit flipped)
    threshold = min(int(round(p * 2**32)), M32) - (1 << 31)
    out = torch.empty(c.shape[0], features, dtype=torch.bool, device=dev)
    rows = max(1, CHUNK // max(features, 1))
    for start in range(0, c.shape[0], rows):
        h = _mix32_i32(c[start:start + rows] ^ j) ^ _signed(1 << 31)
        torch.ge(h, threshold, out=out[start:start + rows])
    return out.view(keys.numel(), tokens, features)


def lora_dropout(x: Tensor, keys: Tensor, layer: int, p: float) -> Tensor:
    """Inverted dropout of ``x`` (``(N, T, d)``; a pooled ``(N, d)`` is one token a row, more dims
    between count as tokens in row-major order): kept entries times ``1 / (1 − p)``, the rest 0 (the
    backward pass keeps the bool mask only: a byte per entry)."""
    if keys.numel() != x.shape[0]:
        raise ValueError(f"{keys.numel()} dropout keys for an input of {x.shape[0]} rows")
    tokens = x[0].numel() // x.shape[-1] if x.shape[0] else 0
    keep = dropout_mask(keys.to(x.device), layer, tokens, x.shape[-1], p).view(x.shape)
    return torch.where(keep, x * (1.0 / (1.0 - p)), x.new_zeros(()))


# ---- slow references: one element at a time, over Python integers ----

def mix32_reference(h: int) -> int:
    """``lowbias32`` with Python's exact products."""
    h ^= h >> 16
    h = (h * _C1) & M32
    h ^= h >> 15
    h = (h * _C2) & M32
    return h ^ (h >> 16)


def dropout_mask_reference(keys: list[int], layer: int, tokens: int, features: int, p: float) -> Tensor:
    """Element-by-element loop for :func:`dropout_mask`."""
    out = torch.zeros(len(keys), tokens, features, dtype=torch.bool)
    salt = mix32_reference((layer & M32) ^ _LAYER_SALT)
    for i, key in enumerate(keys):
        c = mix32_reference(key ^ salt)
        for t in range(tokens):
            ct = mix32_reference(c ^ mix32_reference(t ^ _VALUE_SALT))
            for j in range(features):
                out[i, t, j] = mix32_reference(ct ^ mix32_reference(j ^ _VALUE_SALT)) >= int(round(p * 2**32))
    return out
