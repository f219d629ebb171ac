"""The quantization-error probe's codes and corrections, against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_script

quant_error = load_script("quant_error")


def test_int8_rows_codes_each_row_by_its_own_absmax():
    w = torch.tensor([[1.0, -0.5, 0.26], [10.0, 0.04, -3.0]])
    got = quant_error.int8_rows(w)
    # row 0: s = 1/127: -0.5 -> round(-63.5) = -64 (half to even), 0.26 -> round(33.02) = 33;
    # row 1: s = 10/127: 0.04 -> round(0.508) = 1, -3 -> round(-38.1) = -38
    assert torch.allclose(got[0], torch.tensor([127.0, -64, 33]) / 127)
    assert torch.allclose(got[1], torch.tensor([127, 1, -38]) * 10 / 127)
    assert ((got - w).abs() <= w.abs().amax(1, keepdim=True) / 254 + 1e-7).all()


def test_a_full_rank_correction_restores_the_weight_and_rank_zero_keeps_the_code():
    torch.manual_seed(0)
    w, q = torch.randn(6, 4), torch.randn(6, 4)
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0])
    assert torch.allclose(quant_error.corrected(w, q, 4), w, atol=1e-5)
    assert torch.allclose(quant_error.corrected(w, q, 4, scale), w, atol=1e-5)
    assert torch.equal(quant_error.corrected(w, q, 0), q)


def test_a_rank_one_error_is_removed_by_a_rank_one_correction():
    u, v = torch.tensor([[1.0], [2.0], [0.0]]), torch.tensor([[0.5, -1.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert torch.allclose(quant_error.corrected(q + u @ v, q, 1), q + u @ v, atol=1e-6)


def test_nf4_blocks_are_scaled_by_their_absmax():
    w = torch.zeros(2, 64)
    w[0, 3], w[1, 5] = 0.8, -2.0     # each row one block of 64: its absmax is a code value (±1 × s_b)
    got = quant_error.four_bit(w, "nf4", 64)
    assert torch.allclose(got, w)


def test_groups_are_projection_types_and_blocks():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
             "model.layers.1.self_attn.q_proj"]
    assert quant_error.groups(names) == {
        "q_proj": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"],
        "down_proj": ["model.layers.0.mlp.down_proj"],
        "block 0": ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"],
        "block 1": ["model.layers.1.self_attn.q_proj"]}


def test_write_base_refuses_an_unknown_code_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="use nf4 or nf4-awR"):
        quant_error.write_base(None, None, {}, {}, "int3", tmp_path / "x")
    assert not (tmp_path / "x").exists()
