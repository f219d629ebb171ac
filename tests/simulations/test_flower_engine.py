"""``fedlora-sim --engine flower`` (Flower's Ray simulation, one ClientApp call per client)
against the batched engine: same job and seed, same global adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedlora.simulations.cli import main

pytestmark = pytest.mark.slow


def _job(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--num-clients", "3",
            "--rounds", "3", "--local-steps", "2", "--batch-size", "4", "--rank", "4",
            "--max-length", "16", "--quiet", *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


DP = ["--dp", "sample", "--epsilon", "8", "--delta", "1e-3", "--dp-reproducible"]
PUBLIC = ["--head", "public", "--init-data", "TINY_CSV", "--public-steps", "3"]


@pytest.mark.parametrize("extra", [["--strategy", "flora", "--ranks", "2,4,3"], ["--strategy", "fed-sb"], DP,
                                   [*DP, *PUBLIC],
                                   ["--strategy", "ffa-lora"],
                                   ["--strategy", "fedsa-lora", "--personal-test-fraction", "0.3"],
                                   ["--strategy", "flexlora", "--ranks", "2,4,3"]],
                         ids=["flora-hetero", "fed-sb", "dp-sample", "dp-sample-public-start", "ffa-lora",
                              "fedsa-lora", "flexlora"])
def test_flower_engine_reaches_the_batched_adapter(tiny_bert_dir, tiny_csv, tmp_path, extra):
    # Prepare: the batched run of the job (dp-sample-public-start: the server trains the head, then
    # warm-starts the adapters on the public file, measures the clip there and sends it with each
    # round's config)
    extra = [str(tiny_csv) if a == "TINY_CSV" else a for a in extra]
    batched, flower = tmp_path / "batched", tmp_path / "flower"
    assert main(_job(tiny_bert_dir, tiny_csv, batched, *extra)) == 0
    # Execute: the same job on Flower's simulation engine (3 virtual SuperNodes)
    assert main(_job(tiny_bert_dir, tiny_csv, flower, "--engine", "flower", *extra)) == 0
    # Assert: the same final adapter; the same uploads; stateless Flower clients get
    # at least what the batched engine's clients get each round (folds / shared factors re-sent)
    a = load_file(batched / "adapter" / "adapter_model.safetensors")
    b = load_file(flower / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    rb, rf = _rows(batched), _rows(flower)
    assert [r["round"] for r in rf] == [0, 1, 2, 3]
    for x, y in zip(rb[1:], rf[1:], strict=True):
        assert y["clients"] == 3 and sorted(y["bytes_up_per_client"]) == sorted(x["bytes_up_per_client"])
        assert y["bytes_down"] >= x["bytes_down"]
        assert y["accuracy"] == pytest.approx(x["accuracy"], abs=1e-9)
        # FedSA-LoRA: each client's personal B survives Flower rebuilding it (context.state)
        assert y.get("personal_accuracy") == pytest.approx(x.get("personal_accuracy"), abs=1e-9)
        # DP: each client's ledger survives Flower rebuilding it (kept in the node's context.state)
        assert y.get("epsilon_per_client") == x.get("epsilon_per_client")


def test_flower_engine_under_secagg_reaches_the_plain_batched_adapter(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: the plain batched run, and the job under SecAgg+ on Flower's engine
    batched, flower = tmp_path / "batched", tmp_path / "flower"
    extra = ["--strategy", "ffa-lora", "--max-examples", "100"]
    assert main(_job(tiny_bert_dir, tiny_csv, batched, *extra)) == 0
    # Execute
    assert main(_job(tiny_bert_dir, tiny_csv, flower, "--engine", "flower", "--secagg", *extra)) == 0
    # Assert: every round aggregated securely (3 clients, quantization bound reported), and the
    # same adapter up to what quantization moves it
    assert [(r["clients"], r["secagg_error_bound"] < 1e-7) for r in _rows(flower)[1:]] == [(3, True)] * 3
    a = load_file(batched / "adapter" / "adapter_model.safetensors")
    b = load_file(flower / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-6)


def test_flower_engine_refuses_batched_only_flags(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    # Execute
    code = main(_job(tiny_bert_dir, tiny_csv, tmp_path / "o", "--engine", "flower",
                     "--max-clients-per-pass", "2"))
    # Assert: one line naming the flags
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--engine batched only" in err[0]


SFT = ["--task", "sft", "--text-column", "sentence", "--label-words", "0=negative,1=positive",
       "--prompt-template", "Review: {text}", "--max-length", "24"]


def test_flower_engine_runs_sft_to_the_batched_adapter(tiny_chat_llama_dir, sentiment_tsv, tmp_path):
    # Execute: an sft job on the batched engine, then on Flower's (a ClientApp per client and round)
    batched, flower = tmp_path / "batched", tmp_path / "flower"
    assert main(_job(tiny_chat_llama_dir, sentiment_tsv, batched, *SFT, "--rounds", "2")) == 0
    assert main(_job(tiny_chat_llama_dir, sentiment_tsv, flower, *SFT, "--rounds", "2",
                     "--engine", "flower")) == 0
    # Assert: the same CAUSAL_LM adapter and the same generated-answer accuracy and perplexity
    a = load_file(batched / "adapter" / "adapter_model.safetensors")
    b = load_file(flower / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    for x, y in zip(_rows(batched), _rows(flower), strict=True):
        assert y["answer_accuracy"] == x["answer_accuracy"]
        assert y["perplexity"] == pytest.approx(x["perplexity"], rel=1e-4)
    assert json.loads((flower / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
