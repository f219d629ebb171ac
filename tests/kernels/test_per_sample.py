"""Per-example gradient kernels against their row-by-row autograd references."""

from __future__ import annotations

import torch

from fedlora.kernels.per_sample import (
    dense_grad_sample,
    dense_grad_sample_reference,
    dense_sq_norms,
    dense_weighted_sum,
    dense_weighted_sum_by_ids,
    lora_grad_sample,
    lora_grad_sample_reference,
    sb_grad_sample,
    sb_grad_sample_reference,
)


def _data(N=5, T=3, d_in=7, d_out=6, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, T, d_in, generator=g), torch.randn(N, T, d_out, generator=g),
            torch.randn(N, r, d_in, generator=g), torch.randn(N, d_out, r, generator=g))


def test_lora_grad_sample_equals_reference():
    # Prepare: 5 rows, each with its own client's factors and scale
    x, g, A, B = _data()
    scale = torch.tensor([0.5, 1.0, 2.0, 0.5, 4.0])
    # Execute
    gA, gB = lora_grad_sample(x, g, A, B, scale)
    rA, rB = lora_grad_sample_reference(x, g, A, B, scale)
    # Assert
    torch.testing.assert_close(gA, rA, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gB, rB, rtol=1e-5, atol=1e-5)


def test_lora_grad_sample_of_masked_rank_is_zero():
    # Prepare: rank 1 of r_max 2 (second row of A, column of B masked to zero)
    x, g, A, B = _data()
    A[:, 1] = 0
    B[:, :, 1] = 0
    # Execute
    gA, gB = lora_grad_sample(x, g, A, B, torch.ones(5))
    # Assert: the masked entries get exactly zero gradient
    assert gA[:, 1].abs().max() == 0 and gB[:, :, 1].abs().max() == 0


def test_sb_grad_sample_equals_reference():
    x, g, _, _ = _data()
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 7, generator=gen), torch.randn(6, 2, generator=gen)
    torch.testing.assert_close(sb_grad_sample(x, g, A, B, 0.75),
                               sb_grad_sample_reference(x, g, A, B, 0.75), rtol=1e-5, atol=1e-5)


def test_dense_grad_sample_norms_and_weighted_sums():
    # Prepare
    x, g, _, _ = _data(N=6)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.25])
    # Execute
    gW, gb = dense_grad_sample(x, g)
    rW, rb = dense_grad_sample_reference(x, g)
    # Assert: values, Gram-matrix norms, and per-segment weighted sums (2 segments of 3 rows)
    torch.testing.assert_close(gW, rW, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_sq_norms(x, g), rW.pow(2).sum(dim=(1, 2)), rtol=1e-4, atol=1e-4)
    expect = torch.stack([(w[:3].view(-1, 1, 1) * rW[:3]).sum(0), (w[3:].view(-1, 1, 1) * rW[3:]).sum(0)])
    torch.testing.assert_close(dense_weighted_sum(x, g, w, 2), expect, rtol=1e-4, atol=1e-4)


def test_dense_weighted_sum_by_ids_equals_reference():
    # Prepare: 6 rows of clients 2, 0, 2, 0, 0, 2 (client 1 has none, client 3 is beyond the ids)
    x, g, _, _ = _data(N=6)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.25])
    ids = torch.tensor([2, 0, 2, 0, 0, 2])
    rW, _ = dense_grad_sample_reference(x, g)
    # Execute
    out = dense_weighted_sum_by_ids(x, g, w, ids, 4)
    # Assert: Σ_{i : ids_i = k} w_i ∂ℓ_i/∂W per client, zero where a client has no rows
    expect = torch.zeros(4, 6, 7)
    for i, k in enumerate(ids.tolist()):
        expect[k] += w[i] * rW[i]
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
    assert out[1].abs().max() == 0 and out[3].abs().max() == 0
    # packed contiguous segments of equal size: the same as the segment version
    torch.testing.assert_close(dense_weighted_sum_by_ids(x, g, w, torch.arange(2).repeat_interleave(3), 2),
                               dense_weighted_sum(x, g, w, 2), rtol=1e-5, atol=1e-5)


def test_single_token_rows_are_supported():
    # Prepare: a head's input is one vector per example, (N, d)
    x, g = torch.randn(4, 5), torch.randn(4, 3)
    # Execute
    gW, gb = dense_grad_sample(x, g)
    # Assert: the outer product g_i x_iᵀ and g_i
    torch.testing.assert_close(gW[2], torch.outer(g[2], x[2]))
    torch.testing.assert_close(gb, g)
