"""``--quantize``: LoRA over bitsandbytes 4-bit and 8-bit bases, exact folds as residuals, refusals.

The tiny LLaMA (hidden 32) is quantized on the CPU; every expectation is computed by hand from the
layer's own frozen base (``base(x)``), never from the code under test.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from fedlora.kernels import Routing
from fedlora.models import quantize
from fedlora.models.hub import load_model
from fedlora.models.lora import BatchedLoRALinear, Router, linear_shape
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.models.state import exact_global
from fedlora.simulations.cli import build_parser, check_args, main
from fedlora.simulations.engine import train
from fedlora.strategies import GlobalState

bnb = pytest.importorskip("bitsandbytes")

LAYER = "model.layers.0.self_attn.q_proj"


def _quantized(path, quantize="nf4", **kwargs):
    return load_model(str(path), "causal-lm", quantize=quantize, **kwargs)[0]


def _slots(layer: BatchedLoRALinear, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random nonzero factors in every slot; returns them."""
    out = []
    for k, r in enumerate(layer.ranks):
        A = torch.randn(r, layer.lora_A.shape[2], generator=gen)
        B = torch.randn(layer.lora_B.shape[1], r, generator=gen)
        layer.set_slot(k, A, B)
        out.append((A, B))
    return out


@pytest.mark.parametrize("quantize, cls", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_lora_over_a_quantized_layer_is_base_plus_delta_and_trains_only_adapters(tiny_llama_dir, quantize,
                                                                                   cls):
    # Prepare: a quantized q_proj (its packed weight is not 32 × 32) with two slots of ranks 4 and 2
    base = _quantized(tiny_llama_dir, quantize).get_submodule(LAYER)
    assert type(base).__name__ == cls and linear_shape(base) == (32, 32)
    router = Router()
    layer = BatchedLoRALinear(base, [4, 2], alpha=8.0, router=router)
    assert layer.lora_A.shape == (2, 4, 32) and layer.lora_A.dtype == torch.float32
    factors = _slots(layer, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(x)                          # an eval-mode call without gradients first (CPU repacking)
        y0 = base(x)
    router.routing = Routing.from_ids(torch.tensor([0, 1]))
    xg = x.clone().requires_grad_(True)
    # Execute
    y = layer(xg)
    y.sum().backward()
    # Assert: y = base(x) + s_k x A_kᵀ B_kᵀ per row, with s = 8/4 and 8/2
    scales = (2.0, 4.0)
    delta = torch.stack([s * x[i] @ A.T @ B.T
                         for i, (s, (A, B)) in enumerate(zip(scales, factors, strict=True))])
    torch.testing.assert_close(y.detach(), y0 + delta, rtol=1e-5, atol=1e-5)
    # gradients reach A and B only, and the input through the frozen base (for earlier layers)
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())
    with torch.no_grad():
        W = base(torch.eye(32)).T                  # the base's effective (dequantized) weight, d_out × d_in
    ones = torch.ones(3, 32)
    for i, (s, (A, B)) in enumerate(zip(scales, factors, strict=True)):
        torch.testing.assert_close(xg.grad[i], ones @ (W + s * B @ A), rtol=1e-4, atol=1e-4)


def test_folds_on_an_nf4_base_are_an_exact_residual_compacted_to_its_rank(tiny_llama_dir):
    # Prepare
    base = _quantized(tiny_llama_dir).get_submodule(LAYER)
    packed = base.weight.detach().clone()
    layer = BatchedLoRALinear(base, [2], alpha=2.0, router=Router())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=gen, dtype=torch.float64).float()
    with torch.no_grad():
        y0 = base(x)
    folds = [(torch.randn(8, 32, generator=gen), torch.randn(32, 8, generator=gen)) for _ in range(2)]
    # Execute: two rank-8 folds
    for A, B in folds:
        layer.fold(A, B)
    # Assert: y = base(x) + x (Σ B A)ᵀ, the packed base untouched, the residual of rank 16
    dW = sum(B.double() @ A.double() for A, B in folds)
    with torch.no_grad():
        y = layer(x)
    expected = x.double() @ dW.T
    assert (y.double() - y0.double() - expected).norm() <= 1e-6 * expected.norm()
    assert torch.equal(base.weight.detach(), packed)
    assert layer.fold_U.shape == (32, 16) and layer.fold_V.shape == (16, 32)
    # Execute: a third rank-24 fold (40 > 32 = min(d_out, d_in)), then one that cancels part of it
    A3, B3 = torch.randn(24, 32, generator=gen), torch.randn(32, 24, generator=gen)
    layer.fold(A3, B3)
    layer.fold(A3[:4], -B3[:, :4])
    dW = dW + B3[:, 4:].double() @ A3[4:].double()
    with torch.no_grad():
        y = layer(x)
    # Assert: compaction kept the output and bounds the rank by min(d_out, d_in)
    assert layer.fold_U.shape[1] == 32
    err = (y.double() - y0.double() - x.double() @ dW.T).norm() / (x.double() @ dW.T).norm()
    assert err <= 1e-5
    # a fold that cancels everything leaves no residual at all
    U, V = layer.fold_U.clone(), layer.fold_V.clone()
    layer.fold(V, -U)
    assert layer.fold_U.shape == (32, 0)


def test_exact_global_on_an_nf4_base_restores_the_residual_bit_for_bit(tiny_llama_dir):
    # Prepare: a one-slot model of rank 2 whose global adapter is of rank 4 (FlexLoRA's case)
    fm = FederatedModel(_quantized(tiny_llama_dir), AdapterConfig(ranks=[2], alpha=2.0))
    gen = torch.Generator().manual_seed(0)
    for layer in fm.adapters.values():
        layer.fold(torch.randn(3, 32, generator=gen), torch.randn(32, 3, generator=gen))
    factors = {n: (torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen)) for n in fm.adapters}
    state = GlobalState(factors=factors, scale=0.5)
    name, layer = next(iter(fm.adapters.items()))
    before = layer.fold_state()
    x = torch.randn(3, 32, generator=gen)
    with torch.no_grad():
        y_before = layer(x)
    # Execute
    with exact_global(fm, state), torch.no_grad():
        inside = layer(x)
    # Assert: inside, the whole 0.5 · B A is in the residual; afterwards everything is back
    A, B = factors[name]
    torch.testing.assert_close(inside, y_before + 0.5 * x @ A.T @ B.T, rtol=1e-5, atol=1e-5)
    after = layer.fold_state()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_flexlora_evaluates_its_exact_global_model_in_the_nf4_residual(tiny_llama_dir, tmp_path, monkeypatch):
    # Prepare: record each layer's residual and slot 0 while the server evaluates (FlexLoRA never
    # folds; its global ΔW* (rank 2 + 4 + 2) does not fit a client's slot, so it is evaluated exactly)
    from fedlora.tasks import get_task

    task = type(get_task("causal-lm"))
    evaluate, seen = task.evaluate, []

    def record(self, fm, data, cfg):
        seen.append({n: (layer.fold_U @ layer.fold_V, layer.lora_B[0].abs().max()) for n, layer in
                     fm.adapters.items()})
        return evaluate(self, fm, data, cfg)

    monkeypatch.setattr(task, "evaluate", record)
    out = tmp_path / "flex"
    # Execute
    job, coord = _trained(_sim(tiny_llama_dir, _lm_data(tmp_path), out, "--rounds", "1", "--strategy",
                               "flexlora", "--ranks", "2,4"), out)
    # Assert: round 1 was evaluated with ΔW* = B A (the stacked global factors, scale 1) in each
    # layer's residual and slot 0's adapter zero; afterwards the residual is empty again
    assert len(seen) == 2 and all(float(R.abs().max()) == 0 for R, _ in seen[0].values())  # round 0
    for name, (residual, slot) in seen[1].items():
        A, B = coord.state.factors[name]
        assert A.shape[0] == 8 and slot == 0
        torch.testing.assert_close(residual, B @ A, rtol=1e-5, atol=1e-6)
        assert job.fm.adapters[name].fold_U.shape[1] == 0


def _trained(argv: list[str], out):
    """``(job, coordinator)`` after the batched simulator ran ``argv`` (a job's flags, ``--out``
    included): its model is the global one, its coordinator holds the state."""
    return train(check_args(build_parser().parse_args(argv)), out)


def _lm_data(tmp_path):
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat sat on mat number {i}"}) + "\n" for i in range(40)))
    return data


def _sim(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--num-clients", "3",
            "--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--rank", "4", "--max-length", "16",
            "--task", "causal-lm", "--quiet", "--quantize", "nf4", *extra]


@pytest.mark.parametrize("strategy", ["flora", "fedex-lora"])
def test_folding_strategies_on_nf4_are_exact_and_fold_into_the_residual(tiny_llama_dir, tmp_path, strategy):
    # Prepare
    from fedlora.rounds import loop
    from fedlora.rounds.coordinator import Coordinator
    from fedlora.rounds.sink import RunFolder
    from fedlora.simulations.batched import BatchedTransport
    from fedlora.simulations.cli import build_parser, check_args
    from fedlora.simulations.engine import build_job

    out = tmp_path / strategy
    cfg = check_args(build_parser().parse_args(_sim(tiny_llama_dir, _lm_data(tmp_path), out,
                                                    "--strategy", strategy)))
    job = build_job(cfg)
    assert all(layer.quantized for layer in job.fm.adapters.values())
    coord = Coordinator(cfg, job.strategy, job.fm, job.test, job.public)
    # Execute
    loop.run(coord, BatchedTransport(job, coord, None), RunFolder(out), None)
    # Assert: exact aggregation every round, and each layer's residual is the server's merged update
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["agg_error"] <= 1e-6 for r in rows[1:])
    for name, layer in job.fm.adapters.items():
        A, B = coord.state.merged[name]
        merged = B.double() @ A.double()
        residual = layer.fold_U.double() @ layer.fold_V.double()
        assert merged.norm() > 0
        assert (residual - merged).norm() <= 1e-5 * merged.norm()
    # a restored checkpoint re-applies the folds to a freshly loaded 4-bit base: the same residuals
    fresh = build_job(cfg)
    Coordinator(cfg, fresh.strategy, fresh.fm, fresh.test, fresh.public).restore(coord.save(out))
    for name, layer in fresh.fm.adapters.items():
        want = job.fm.adapters[name].fold_U.double() @ job.fm.adapters[name].fold_V.double()
        got = layer.fold_U.double() @ layer.fold_V.double()
        assert (got - want).norm() <= 1e-6 * want.norm()


def test_a_coordinate_median_over_nf4_is_the_median_of_the_uploads(tiny_llama_dir, tmp_path, monkeypatch):
    # Prepare: record what the server's defence receives (the clients trained over the 4-bit base)
    from fedlora.strategies.robust import Robust

    seen = []
    aggregate = Robust.aggregate

    def record(self, uploads, state):
        seen.append(list(uploads))
        return aggregate(self, uploads, state)

    monkeypatch.setattr(Robust, "aggregate", record)
    out = tmp_path / "median"
    # Execute: one FedAvg round with the coordinate-wise median of 3 clients
    flags = _sim(tiny_llama_dir, _lm_data(tmp_path), out, "--rounds", "1", "--robust-mean", "median")
    assert main(flags) == 0
    # Assert: the global A and B are the middle client's value, coordinate by coordinate (all clients
    # start from the same global factors, so the median of updates is the median of the factors); the
    # export holds A and s·B, s = α/r = 16/4
    (uploads,) = seen
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {u.scale for u in uploads} == {4.0}
    for layer in uploads[0].factors:
        for i, kind, scale in ((0, "A", 1.0), (1, "B", 4.0)):
            stack = torch.stack([u.factors[layer][i].double() for u in uploads])
            want = scale * stack.sort(dim=0).values[1]
            got = adapter[f"base_model.model.{layer}.lora_{kind}.weight"].double()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            assert (stack[0] != stack[1]).any()                 # the clients did differ


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_dp_sample_over_a_quantized_base_fedlora_kernels_equal_opacus(tiny_llama_dir, tmp_path, quantize):
    # Execute: one private round over the 4- or 8-bit base, with fedlora's per-example gradients (all
    # clients in one pass) and with Opacus' GradSampleModule (one client at a time), noise keyed to the
    # seed. (An int8 layer computes otherwise in training mode on CPU: Opacus' path once set the adapters'
    # base layers training too, and its adapter differed by 1.3e-3.)
    data = _lm_data(tmp_path)
    for backend in ("fedlora", "opacus"):
        assert main(_sim(tiny_llama_dir, data, tmp_path / backend, "--rounds", "1", "--dp", "sample",
                         "--dp-backend", backend, "--epsilon", "8", "--delta", "1e-3",
                         "--dp-reproducible", "--quantize", quantize)) == 0
    # Assert: the round spent budget and moved the adapter, the same adapter either way
    rows = [json.loads(line) for line in (tmp_path / "fedlora" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["dp"] == "sample" and rows[-1]["dp_backend"] == "fedlora" and 0 < rows[-1]["epsilon"] <= 8
    ours, opacus = (load_file(tmp_path / b / "adapter" / "adapter_model.safetensors")
                    for b in ("fedlora", "opacus"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in ours.items())
    for k in ours:
        torch.testing.assert_close(opacus[k], ours[k], rtol=1e-4, atol=1e-6)


def _refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_refusals_are_one_line(tiny_llama_dir, tiny_csv, tmp_path, capsys, monkeypatch):
    data = _lm_data(tmp_path)
    # the bundled MiniLM classifier
    line = _refused(capsys, ["--model", "minilm", "--data", str(tiny_csv), "--out", str(tmp_path / "m"),
                             "--quantize", "nf4", "--quiet"])
    assert "MiniLM is tiny" in line and "head is never quantized" in line
    # --double-quant without a 4-bit base
    line = _refused(capsys, _sim(tiny_llama_dir, data, tmp_path / "d", "--quantize", "int8",
                                 "--double-quant"))
    assert "--double-quant" in line and "nf4 or fp4" in line
    # no linear layer left for bitsandbytes to replace (every block linear skipped like a head)
    monkeypatch.setattr(quantize, "UNQUANTIZED_HEADS", ("classifier", "score", "proj"))
    line = _refused(capsys, _sim(tiny_llama_dir, data, tmp_path / "n"))
    assert "bitsandbytes replaced no linear layer" in line
    monkeypatch.undo()
    # bitsandbytes not installed
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    line = _refused(capsys, _sim(tiny_llama_dir, data, tmp_path / "b"))
    assert "pip install bitsandbytes==0.50.2" in line and ".[llm]" in line
