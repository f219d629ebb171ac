"""``--quant-correction``: the frozen low-rank correction beside a quantized base."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedlora.models.correction import (
    MARKER,
    Checkpoint,
    CorrectedLinear,
    computed_weight,
    correction_factors,
    input_scales,
    quantized_layers,
)
from fedlora.models.export import export_model
from fedlora.models.hub import load_model

bnb = pytest.importorskip("bitsandbytes")


def test_correction_factors_fit_the_error_as_the_inputs_weight_it():
    # Prepare: E = diag(3, 2); channel 1's inputs are 10× channel 0's
    E = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    # Execute
    U1, V1 = correction_factors(E, 1)                                   # plain: the larger error
    Uw, Vw = correction_factors(E, 1, torch.tensor([1.0, 10.0]))        # weighted: E S = diag(3, 20)
    U2, V2 = correction_factors(E, 5, torch.tensor([1.0, 10.0]))        # rank capped at min(d_out, d_in)
    # Assert: hand-computed rank-1 fits, and the whole error at full rank
    torch.testing.assert_close(U1 @ V1, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(Uw @ Vw, torch.tensor([[0.0, 0.0], [0.0, 2.0]]))
    assert U2.shape == (2, 2) and V2.shape == (2, 2)
    torch.testing.assert_close(U2 @ V2, E)


def test_a_channel_no_input_used_is_floored_not_divided_by_zero():
    U, V = correction_factors(torch.ones(3, 2), 2, torch.tensor([0.0, 1.0]))
    assert torch.isfinite(V).all()
    torch.testing.assert_close(U @ V, torch.ones(3, 2))                 # full rank: still exact


def test_computed_weight_is_what_a_layer_multiplies_by(tiny_llama_dir):
    plain = nn.Linear(5, 3)
    torch.testing.assert_close(computed_weight(plain), plain.weight.detach())
    layer = load_model(str(tiny_llama_dir), "causal-lm", quantize="nf4")[0].get_submodule(
        "model.layers.0.mlp.down_proj")                                 # 64 -> 32, no bias
    W = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    torch.testing.assert_close(computed_weight(layer), W)
    assert computed_weight(layer).shape == (32, 64)


@pytest.mark.parametrize("model, adapted, other, layers", [
    ("tiny_llama_dir", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", 14),   # 2 × 7
    ("tiny_gpt2_dir", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", 8),  # Conv1D: stored Wᵀ
])
def test_a_full_rank_correction_restores_the_unquantized_model(request, model, adapted, other, layers):
    # Prepare: the fp32 model, and the nf4 one with a rank-64 (≥ every layer's min(d_out, d_in)) correction
    from fedlora.models.correction import add_correction
    from fedlora.models.model import AdapterConfig, FederatedModel

    path = request.getfixturevalue(model)
    full = load_model(str(path), "causal-lm")[0].eval()
    nf4 = load_model(str(path), "causal-lm", quantize="nf4")[0]
    fm = FederatedModel(nf4, AdapterConfig(ranks=[2]))
    ids = torch.tensor([[5, 17, 99, 300, 42, 7]])
    with torch.no_grad():
        before = fm(input_ids=ids).logits
    # Execute
    out = add_correction(fm, path, 64, [], {"quantize": "nf4", "rank": 64})
    # Assert: every linear layer but the LM head is corrected; adapted ones inside their adapter; the
    # logits are the fp32 model's, which nf4 alone is far from
    assert len(out) == layers and adapted in fm.adapters and adapted in out
    assert isinstance(fm.adapters[adapted].base, CorrectedLinear)
    assert isinstance(fm.model.get_submodule(other), CorrectedLinear)
    with torch.no_grad():
        want, got = full(input_ids=ids).logits, fm(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 < (before - want).abs().max()
    assert fm.correction is out and fm.correction_note["rank"] == 64


def test_input_scales_are_mean_abs_over_unpadded_tokens_only():
    # Prepare: a model whose quantized-like layers see the embeddings (x = ids as one feature): one
    # every token, one (a pooler) each sequence's first
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.pool = nn.Linear(1, 1), nn.Linear(1, 1)

        def forward(self, input_ids, attention_mask):
            x = input_ids.float().unsqueeze(-1)                 # (B, T, 1)
            return self.lin(x), self.pool(x[:, 0])               # a pooler sees (B, 1): first tokens

    tiny = Tiny()
    batches = [{"input_ids": torch.tensor([[2, -4, 100]]), "attention_mask": torch.tensor([[1, 1, 0]])},
               {"input_ids": torch.tensor([[6, 1, 1], [-8, 5, 0]]),
                "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}]
    # Execute
    scales = input_scales(tiny, {"lin": tiny.lin, "pool": tiny.pool}, batches)
    # Assert: the tokens' (|2| + |-4| + |6| + |1| + |1| + |-8| + |5|) / 7, the padded 100 and 0 not
    # read; the pooler's first tokens (|2| + |6| + |-8|) / 3 (it used to fail on the token mask)
    torch.testing.assert_close(scales["lin"], torch.tensor([27 / 7]))
    torch.testing.assert_close(scales["pool"], torch.tensor([16 / 3]))


def test_checkpoint_finds_a_layer_under_another_prefix(tiny_llama_dir):
    ckpt = Checkpoint(tiny_llama_dir)
    assert ckpt.weight("model.layers.0.self_attn.q_proj").shape == (32, 32)
    assert ckpt.weight("transformer.model.layers.0.self_attn.q_proj").shape == (32, 32)
    assert not quantized_layers(nn.Linear(2, 2))


def _sft(model, data, *extra):
    return ["--task", "sft", "--model", str(model), "--data", str(data), "--text-column", "sentence",
            "--label-words", "0=negative,1=positive", "--prompt-template", "Review: {text}", "--num-clients",
            "2", "--rounds", "1", "--local-steps", "2", "--batch-size", "4", "--rank", "4", "--max-length",
            "24", "--lr", "5e-2", "--quantize", "nf4", "--eval-max", "3", *extra]


@pytest.mark.parametrize("strategy", ["fedavg", "flora"])
def test_a_corrected_job_exports_an_adapter_peft_loads_onto_the_same_nf4_base(
        tiny_chat_llama_dir, sentiment_tsv, tmp_path, strategy):
    # Prepare: a round of sft over nf4 with a rank-3 correction calibrated on the data file (FLoRA: its
    # round's update folded into the exact residual beside the corrected 4-bit layer)
    peft = pytest.importorskip("peft")
    from tests.fedlora.test_quantize import _trained

    out = tmp_path / "run"
    job, coord = _trained([*_sft(tiny_chat_llama_dir, sentiment_tsv, "--quant-correction", "3",
                             "--quant-calibration", str(sentiment_tsv)), "--strategy", strategy,
                           "--out", str(out), "--quiet"], out)
    prompts = [torch.tensor([p]) for p in job.test.prompts[:3]]
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": job.test.tokenizer.pad_token_id}
    with torch.no_grad():
        ours = [job.fm.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw) for p in prompts]
        ours_logits = job.fm(input_ids=prompts[0]).logits
    # Execute: the job's export (as its run folder writes it), loaded by PEFT onto a fresh nf4 base
    export_model(job.fm, coord.state, out / "adapter", str(tiny_chat_llama_dir), "CAUSAL_LM")
    theirs = peft.PeftModel.from_pretrained(
        load_model(str(tiny_chat_llama_dir), "causal-lm", quantize="nf4")[0], out / "adapter").eval()
    # Assert: the same model; q/v carry update and correction (rank 4 + 3), the other layers the correction
    with torch.no_grad():
        for p, want in zip(prompts, ours, strict=True):
            got = theirs.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw)
            assert got.tolist() == want.tolist()
        torch.testing.assert_close(theirs(input_ids=prompts[0]).logits, ours_logits, rtol=1e-4, atol=1e-4)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 14
    assert config["rank_pattern"]["model.layers.0.mlp.down_proj"] == 3
    if strategy == "fedavg":
        assert config["r"] == 7
    else:  # the folded update (2 clients' rank 4; FLoRA's global holds no factors) + the correction (3)
        assert coord.state.merged and coord.state.factors is None and config["r"] == 8 + 3
    note = json.loads((out / "adapter" / MARKER).read_text())
    assert note == {"quantize": "nf4", "rank": 3, "calibration": str(sentiment_tsv)}


def test_refusals_are_one_line(tiny_chat_llama_dir, sentiment_tsv, tmp_path, capsys):
    from fedlora.simulations.cli import main

    def refused(*extra) -> str:  # one line; one refused while building the model follows the progress bar
        argv = [*_sft(tiny_chat_llama_dir, sentiment_tsv), "--out", str(tmp_path / "x"), *extra]
        assert main(argv) == 2 and not (tmp_path / "x").exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 or (len(err) == 2 and " 2 clients " in err[0])
        return err[-1]

    assert "without --quantize" in refused("--quantize", "none", "--quant-correction", "4")
    assert "pass --quant-correction N" in refused("--quant-calibration", str(sentiment_tsv))
    assert "must be ≥ 1" in refused("--quant-correction", "-1")
    # a rank at least every layer's min(d_out, d_in) (the tiny LLaMA's largest: 32) bounds nothing
    assert refused("--quant-correction", "32") == (
        "fedlora-sim: error: --quant-correction 32 is at least the full rank of every quantized layer (the"
        " largest is 32), so it would keep whole matrices, not a low-rank part: pass a rank below 32, or drop"
        " --quant-correction")
    assert "--fold-rank 40 is at least the full rank of every adapted layer" in refused(
        "--strategy", "flora", "--fold-rank", "40")
    msg = refused("--quant-correction", "4", "--quant-calibration", str(tmp_path / "nope.tsv"))
    assert "--quant-calibration:" in msg and "nope.tsv" in msg


def test_init_data_is_the_default_calibration_and_is_then_read(tiny_chat_llama_dir, sentiment_tsv, tmp_path):
    from fedlora.job.setup import build_model
    from fedlora.simulations.cli import build_parser, check_args
    from fedlora.strategies.plan import LORA

    args = build_parser().parse_args([*_sft(tiny_chat_llama_dir, sentiment_tsv, "--quant-correction", "2",
                                            "--init-data", str(sentiment_tsv)), "--out", str(tmp_path / "x")])
    cfg = check_args(args)                          # --init-data is read (not "reads none: drop it")
    fm = build_model(cfg, [2], LORA)[0]
    assert fm.correction_note == {"quantize": "nf4", "rank": 2, "calibration": str(sentiment_tsv)}
    assert all(V.shape[0] == 2 for V, _ in fm.correction.values())


def test_an_adapter_holding_a_correction_refuses_another_base_or_a_second_correction(tmp_path):
    from fedlora.errors import UserError
    from fedlora.models.adapter import PeftAdapter, check_correction

    held = PeftAdapter(tmp_path, "m", {}, {}, {"quantize": "nf4", "rank": 8, "calibration": None})
    check_correction(held, "nf4")                                           # the same base: loads
    check_correction(PeftAdapter(tmp_path, "m", {}, {}), "none", correcting=True)  # none held: anything goes
    with pytest.raises(UserError, match="wrong for --quantize none: pass --quantize nf4"):
        check_correction(held, "none")
    with pytest.raises(UserError, match="already: drop --quant-correction"):
        check_correction(held, "nf4", correcting=True)


def test_a_large_error_gets_the_randomized_svd_within_a_percent_and_the_same_twice():
    from fedlora.models.correction import top_singular

    gen = torch.Generator().manual_seed(0)
    M = torch.randn(120, 90, generator=gen) @ torch.diag(torch.linspace(3, 0.1, 90)) @ torch.linalg.qr(
        torch.randn(90, 90, generator=gen))[0]
    P, sig, Qh = top_singular(M, 4)                     # 90 > 2 × (4 + 8): the randomized path
    exact = torch.linalg.svdvals(M.double())
    assert P.shape == (120, 4) and Qh.shape == (4, 90)
    residual = (M - (P * sig) @ Qh).norm()
    assert residual <= 1.01 * exact[4:].norm()          # Eckart–Young's best, within 1%
    torch.testing.assert_close(top_singular(M, 4)[1], sig, rtol=0, atol=0)
