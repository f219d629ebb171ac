"""``--fold-rank N``: the residual beside a quantized base keeps its top N singular directions, and
every row reports what that costs (``fold_truncation_error``).

Residuals are built from orthonormal factors with chosen singular values, so what a truncation
drops is known by hand: its Frobenius norm is that of the singular values left out.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.models.lora import BatchedLoRALinear, Router, compact_residual
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.models.state import exact_global
from fedlora.strategies import GlobalState
from fedlora.strategies.factors import residual_error
from tests.fedlora.test_quantize import LAYER, _lm_data, _quantized, _sim, _trained

SIGMA = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)


def known_residual(seed: int = 0, d: int = 32) -> tuple[torch.Tensor, ...]:
    """``(U, V, Q1, Q2)`` with ``U V = Q1 diag(SIGMA) Q2ᵀ`` (orthonormal Q1, Q2: d × 5), U and V
    deliberately not orthogonal (mixed by a random invertible 5 × 5 matrix)."""
    gen = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(d, 5, generator=gen, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(d, 5, generator=gen, dtype=torch.float64))[0]
    M = torch.randn(5, 5, generator=gen, dtype=torch.float64) + 3 * torch.eye(5, dtype=torch.float64)
    return Q1 * SIGMA @ M, torch.linalg.solve(M, Q2.T), Q1, Q2


def test_truncation_keeps_the_top_directions_and_costs_the_dropped_singular_values():
    # Prepare: U V with singular values 5, 4, 3, 2, 1
    U, V, Q1, Q2 = known_residual()
    # Execute: exact, then bounded to 2 directions
    Ue, Ve = compact_residual(U, V)
    Ut, Vt = compact_residual(U, V, max_rank=2)
    # Assert: exact keeps all 5 and the product; the bound keeps 5 and 4 (Q1[:, :2] diag(5, 4) Q2[:, :2]ᵀ)
    assert Ue.shape == (32, 5) and (Ue @ Ve - U @ V).norm() <= 1e-12 * (U @ V).norm()
    assert Ut.shape == (32, 2) and Vt.shape == (2, 32)
    torch.testing.assert_close(Ut @ Vt, Q1[:, :2] * SIGMA[:2] @ Q2[:, :2].T, rtol=0, atol=1e-12)
    assert float((U @ V - Ut @ Vt).norm()) == pytest.approx(14 ** 0.5)          # √(3² + 2² + 1²)
    # ... and the row's column is that cost relative to the exact residual: √14 / √55
    state = GlobalState(merged={"w": (V, U)}, residual={"w": (Vt, Ut)})
    assert residual_error(state) == pytest.approx((14 / 55) ** 0.5)
    # a layer that holds nothing of its folds costs all of them; no truncation costs nothing
    assert residual_error(GlobalState(merged={"w": (V, U)}, residual={})) == pytest.approx(1.0)
    assert residual_error(GlobalState(merged={"w": (V, U)})) == 0.0
    # a bound above the rank changes nothing
    assert compact_residual(U, V, max_rank=8)[0].shape == (32, 5)


def test_an_nf4_layer_with_a_fold_rank_holds_the_truncated_residual(tiny_llama_dir):
    # Prepare: an nf4 q_proj whose residual keeps 2 directions
    base = _quantized(tiny_llama_dir).get_submodule(LAYER)
    layer = BatchedLoRALinear(base, [2], alpha=2.0, router=Router(), fold_rank=2)
    U, V, Q1, Q2 = known_residual(1)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y0 = base(x)
    # Execute: fold the rank-5 update
    layer.fold(V.float(), U.float())
    with torch.no_grad():
        y = layer(x)
    # Assert: y = base(x) + x (Q1[:, :2] diag(5, 4) Q2[:, :2]ᵀ)ᵀ, a rank-2 residual
    top = (Q1[:, :2] * SIGMA[:2] @ Q2[:, :2].T).float()
    assert layer.fold_U.shape == (32, 2)
    torch.testing.assert_close(y, y0 + x @ top.T, rtol=1e-5, atol=1e-5)
    # an exact fold (an evaluation's) is not truncated: the residual is top + U V (rank 5)
    layer.fold(V.float(), U.float(), exact=True)
    assert layer.fold_U.shape == (32, 5)
    torch.testing.assert_close(layer.fold_U @ layer.fold_V, top + (U @ V).float(), rtol=1e-5, atol=1e-5)


def test_exact_global_is_exact_under_a_fold_rank(tiny_llama_dir):
    # Prepare: FlexLoRA's case (a rank-4 global adapter, slots of rank 2) with --fold-rank 1
    fm = FederatedModel(_quantized(tiny_llama_dir), AdapterConfig(ranks=[2], alpha=2.0, fold_rank=1))
    gen = torch.Generator().manual_seed(0)
    factors = {n: (torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen)) for n in fm.adapters}
    name, layer = next(iter(fm.adapters.items()))
    x = torch.randn(3, 32, generator=gen)
    with torch.no_grad():
        y_before = layer(x)
    # Execute
    with exact_global(fm, GlobalState(factors=factors, scale=0.5)), torch.no_grad():
        inside = layer(x)
    # Assert: the whole rank-4 0.5 · B A is in the residual while evaluating, then nothing is
    A, B = factors[name]
    torch.testing.assert_close(inside, y_before + 0.5 * x @ A.T @ B.T, rtol=1e-5, atol=1e-5)
    assert layer.fold_U.shape == (32, 0)


def test_flora_on_nf4_with_a_fold_rank_reports_its_cost_and_exports_what_it_holds(tiny_llama_dir, tmp_path):
    # Prepare: FLoRA, 3 clients of rank 4 (a rank-12 fold per round), residuals of rank 2
    from fedlora.models.export import export_peft

    out = tmp_path / "run"
    # Execute
    job, coord = _trained(_sim(tiny_llama_dir, _lm_data(tmp_path), out, "--strategy", "flora", "--fold-rank",
                               "2", "--lr", "2e-2"), out)
    # Assert: every layer holds 2 directions; every row reports the truncation's cost, computed
    # here densely from the exact merged update M and the held residual R: √(Σ‖M − R‖² / Σ‖M‖²)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[0]["fold_truncation_error"] == 0.0
    num = den = 0.0
    for name, layer in job.fm.adapters.items():
        assert layer.fold_U.shape == (32, 2)
        A, B = coord.state.merged[name]
        M, R = B.double() @ A.double(), layer.fold_U.double() @ layer.fold_V.double()
        num, den = num + float((M - R).norm() ** 2), den + float(M.norm() ** 2)
    assert 0 < rows[-1]["fold_truncation_error"] == pytest.approx((num / den) ** 0.5, rel=1e-5)
    assert rows[-1]["agg_error"] <= 1e-6                     # the aggregate itself is still exact
    # the export holds the truncated residual the model was evaluated with (rank 2 per layer)
    from safetensors.torch import load_file

    adapter = load_file(export_peft(coord.state, list(job.fm.adapters), tmp_path / "adapter",
                                    str(tiny_llama_dir), "CAUSAL_LM", []) / "adapter_model.safetensors")
    layer = job.fm.adapters[LAYER]
    A, B = (adapter[f"base_model.model.{LAYER}.lora_{f}.weight"] for f in ("A", "B"))
    assert A.shape == (2, 32)
    torch.testing.assert_close(B @ A, layer.fold_U @ layer.fold_V, rtol=1e-5, atol=1e-6)
