"""Keyed LoRA dropout masks: the vectorized hash against its Python-integer reference, statistics,
determinism and the inverted-dropout scaling."""

from __future__ import annotations

import pytest
import torch

from fedlora.kernels import dropout, dropout_mask, lora_dropout, row_keys, subrow_keys
from fedlora.kernels.dropout import (
    _LAYER_SALT,
    M32,
    _mix32_i32,
    dropout_mask_reference,
    mix32,
    mix32_reference,
)


def test_mix32_equals_exact_integer_products_without_overflow():
    # Prepare: the edges of [0, 2^32) and random values
    g = torch.Generator().manual_seed(0)
    h = torch.cat([torch.tensor([0, 1, 2**16 - 1, 2**31, M32 - 1, M32]),
                   torch.randint(0, 2**32, (500,), generator=g, dtype=torch.long)])
    # Execute / Assert: the int64 split products equal Python's exact ones, and stay in [0, 2^32)
    got = mix32(h)
    assert got.tolist() == [mix32_reference(v) for v in h.tolist()]
    assert int(got.min()) >= 0 and int(got.max()) <= M32
    assert mix32_reference(0) == 0 and mix32_reference(1) != 1  # lowbias32 fixes 0 only
    # the elements' int32 form (wrapping products, masked shifts) holds the same bits
    signed = (h - ((h >> 31) << 32)).to(torch.int32)
    assert (_mix32_i32(signed).long() & M32).tolist() == got.tolist()


def test_mask_equals_the_element_by_element_reference_in_chunks_of_any_size(monkeypatch):
    keys = row_keys(torch.tensor([7, 7, 2**40 + 3]), torch.tensor([1, 1, 2]), 5, torch.tensor([0, 1, 0]))
    want = dropout_mask_reference(keys.tolist(), 3, 4, 6, 0.3)
    assert torch.equal(dropout_mask(keys, 3, 4, 6, 0.3), want)
    for chunk in (1, 6, 13, 30):  # a token's features a chunk, part of one, several, uneven
        monkeypatch.setattr(dropout, "CHUNK", chunk)
        assert torch.equal(dropout_mask(keys, 3, 4, 6, 0.3), want)


def test_same_key_same_mask_and_the_kept_share_is_one_minus_p():
    # Prepare: 64 rows' keys, 16 tokens, 64 features (65,536 elements)
    keys = row_keys(torch.full((64,), 11), torch.full((64,), 2), 3, torch.arange(64))
    # Execute
    mask = dropout_mask(keys, 0, 16, 64, 0.1)
    # Assert: deterministic, in any row order; another layer (or key) gives another mask
    assert torch.equal(mask, dropout_mask(keys, 0, 16, 64, 0.1))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dropout_mask(keys[perm], 0, 16, 64, 0.1), mask[perm])
    assert not torch.equal(dropout_mask(keys, 1, 16, 64, 0.1), mask)
    # the share kept is 0.9 within 4 standard deviations (sqrt(0.09 / 65536) = 0.0012), per row,
    # per token position and per feature within their own (larger) deviations: no structure
    share = mask.float()
    assert abs(float(share.mean()) - 0.9) < 0.005
    for dims, n in (((1, 2), 1024), ((0, 2), 4096), ((0, 1), 1024)):
        assert float((share.mean(dim=dims) - 0.9).abs().max()) < 5 * (0.09 / n) ** 0.5
    # P = 0 keeps everything; a larger P drops a superset of a smaller P's drops
    assert bool(dropout_mask(keys, 0, 16, 64, 0.0).all())
    assert bool((dropout_mask(keys, 0, 16, 64, 0.3) <= mask).all())


def test_row_keys_differ_for_every_seed_round_step_and_example():
    # Prepare: 4 seeds (one beyond 32 bits, one differing only there) × 3 rounds × 5 steps × 16 examples
    seeds = torch.tensor([0, 1, 2**33, 2**33 + 1])
    grid = torch.cartesian_prod(seeds, torch.arange(3), torch.arange(16))
    keys = torch.cat([row_keys(grid[:, 0], grid[:, 1], step, grid[:, 2]) for step in range(5)])
    # Assert: 960 distinct keys; several-row examples give each row its own key
    assert keys.unique().numel() == 960
    sub = subrow_keys(keys[:10], 2)
    assert sub.numel() == 20 and sub.unique().numel() == 20
    assert torch.equal(subrow_keys(keys, 1), keys)


def test_inverted_dropout_by_hand():
    # Prepare: x = 1..12 over (1 row, 2 tokens, 6 features), P = 0.5 (so kept entries double, exactly)
    x = torch.arange(1.0, 13.0).view(1, 2, 6)
    keys = torch.tensor([12345])
    mask = dropout_mask_reference([12345], 4, 2, 6, 0.5)
    # Execute
    got = lora_dropout(x, keys, 4, 0.5)
    # Assert: 2·x where kept, 0 elsewhere; some of each
    assert torch.equal(got, torch.where(mask, 2 * x, torch.zeros(())))
    assert 0 < int(mask.sum()) < 12
    with pytest.raises(ValueError, match="2 dropout keys for an input of 1 rows"):
        lora_dropout(x, torch.tensor([1, 2]), 4, 0.5)


def test_a_pooled_input_of_one_token_a_row_is_dropped_as_its_only_token():
    # Prepare: (N, d) rows, as BERT's pooler (adapted under all-linear) reads, and the same as (N, 1, d)
    x = torch.arange(1.0, 13.0).view(2, 6)
    keys = torch.tensor([5, 6])
    # Execute / Assert: the mask of token 0 of each row, in x's own shape
    assert torch.equal(lora_dropout(x, keys, 1, 0.5), lora_dropout(x.view(2, 1, 6), keys, 1, 0.5).view(2, 6))
    assert lora_dropout(x[:0], keys[:0], 1, 0.5).shape == (0, 6)


def _unmix(h: int) -> int:
    """The inverse of ``lowbias32`` (:func:`mix32_reference`)."""
    def unshift(h, s):  # inverse of h ^ (h >> s)
        out = h
        for _ in range(32 // s + 1):
            out = h ^ (out >> s)
        return out
    h = unshift(h, 16)
    h = (h * pow(0x846CA68B, -1, 2**32)) & M32
    h = unshift(h, 15)
    h = (h * pow(0x7FEB352D, -1, 2**32)) & M32
    return unshift(h, 16)


def test_rows_whose_hash_states_differ_in_a_low_bit_draw_unrelated_masks():
    # Prepare: two rows whose layer-0 states differ in bit 0 only: were the token number xored into
    # the state as is, token t of one row would hash as token t ^ 1 of the other (the whole mask of a
    # token shared); the same for two tokens' states and the feature number
    assert _unmix(mix32_reference(123456789)) == 123456789
    salt = mix32_reference(_LAYER_SALT)   # layer 0's
    key = 987654321
    c = mix32_reference(key ^ salt)
    twin = _unmix(c ^ 1) ^ salt
    # Execute
    a, b = dropout_mask(torch.tensor([key, twin]), 0, 8, 64, 0.5)
    # Assert: no token of one row has a token's mask of the other; about half the features agree
    assert not any(torch.equal(b[t], a[u]) for t in range(8) for u in range(8))
    assert all(16 < int((b[t] == a[t ^ 1]).sum()) < 48 for t in range(8))
