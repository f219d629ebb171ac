"""--task sft end to end on a tiny chat LLaMA: every strategy, DP-SGD, compare, and bad input."""

from __future__ import annotations

import json

import pytest

from fedlora.simulations import compare
from fedlora.simulations.cli import main
from fedlora.strategies import STRATEGIES

SFT_FIELDS = {"answer_accuracy", "perplexity", "loss", "eval_examples", "train_seconds", "eval_seconds",
              "seconds"}


def _args(model, data, out, *extra):
    return ["--task", "sft", "--model", str(model), "--data", str(data), "--out", str(out),
            "--text-column", "sentence", "--label-words", "0=negative,1=positive",
            "--prompt-template", "Review: {text}", "--num-clients", "3", "--rounds", "2",
            "--local-steps", "2", "--batch-size", "4", "--rank", "4", "--max-length", "24", "--quiet",
            *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


#: Every registered strategy (mixed ranks where a strategy takes them, personal held-out rows where
#: it keeps personal factors), and DP-SGD.
CASES = {**{name: ["--strategy", name, *(["--ranks", "2,4"] if cls.heterogeneous_ranks else []),
                   *(["--personal-test-fraction", "0.25"] if cls.adapter_plan.keep else [])]
            for name, cls in sorted(STRATEGIES.items())},
         "dp-sample": ["--dp", "sample", "--epsilon", "8", "--delta", "1e-3"]}


@pytest.mark.parametrize("extra", list(CASES.values()), ids=list(CASES))
def test_sft_rows_and_causal_lm_export(tiny_chat_llama_dir, sentiment_tsv, tmp_path, extra):
    out = tmp_path / "run"
    assert main(_args(tiny_chat_llama_dir, sentiment_tsv, out, *extra)) == 0
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert SFT_FIELDS <= set(r) and r["metric"] == "answer_accuracy"
        assert r["accuracy"] == r["answer_accuracy"] and 0.0 <= r["accuracy"] <= 1.0
        assert r["perplexity"] == pytest.approx(__import__("math").exp(r["loss"]), rel=1e-6)
        assert r["eval_examples"] == 24                       # 20% of 120 rows held out
        assert r["seconds"] == pytest.approx(r["train_seconds"] + r["eval_seconds"], abs=2e-3)
    if "--personal-test-fraction" in extra:  # B stays personal: the global model is the base's
        assert rows[-1]["loss"] == rows[0]["loss"] and rows[-1]["personal_clients"] == 3
        assert rows[-1]["train_loss"] < rows[1]["train_loss"]
    else:
        assert rows[-1]["loss"] < rows[0]["loss"]             # the responses became likelier
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None


def test_test_data_with_other_columns_and_eval_max(tiny_chat_llama_dir, sentiment_tsv, tmp_path):
    dev = tmp_path / "dev.tsv"
    dev.write_text("label\tcontent\n" + "".join(f"{i % 2}\t{'great' if i % 2 else 'awful'} film {i}\n"
                                                for i in range(30)))
    out = tmp_path / "dev-run"
    assert main(_args(tiny_chat_llama_dir, sentiment_tsv, out, "--test-data", str(dev),
                      "--test-text-column", "content", "--eval-max", "10", "--rounds", "1")) == 0
    assert [r["eval_examples"] for r in _rows(out)] == [10, 10]


def test_compare_reports_answer_accuracy_and_perplexity(tiny_chat_llama_dir, sentiment_tsv, tmp_path):
    out = tmp_path / "cmp"
    argv = _args(tiny_chat_llama_dir, sentiment_tsv, out, "--rounds", "1")
    assert compare.main([*argv, "--strategies", "fedavg,fed-sb"]) == 0
    table = (out / "comparison.md").read_text()
    assert "final ppl" in table and "answer accuracy" in table
    assert (out / "perplexity_per_round.png").stat().st_size > 0
    csv_head = (out / "comparison.csv").read_text().splitlines()[1]
    assert ",answer_accuracy," in csv_head


@pytest.mark.parametrize("case, message", [
    ("columns", "odd.jsonl has no prompt/response columns (columns: query, reply)"),
    ("long-response", "1 of 8 training responses alone have --max-length 24 tokens or more"),
    ("no-template", "tokenizer has no chat template"),
    ("gguf", "transformers cannot load broken.gguf"),
    ("encoder", "--task sft needs a causal language model, and minilm is an encoder"),
])
def test_bad_sft_input_is_one_line_and_writes_nothing(tiny_chat_llama_dir, tiny_llama_dir, sentiment_tsv,
                                                      tmp_path, capsys, monkeypatch, case, message):
    # Prepare: one bad input per case
    model, data = tiny_chat_llama_dir, sentiment_tsv
    extra: list[str] = []
    if case == "columns":
        data = tmp_path / "odd.jsonl"
        data.write_text(json.dumps({"query": "q", "reply": "a"}) + "\n")
        extra = ["--label-words", "", "--prompt-template", ""]
    elif case == "long-response":
        data = tmp_path / "long.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "ok"}) + "\n" for i in range(9))
                        + json.dumps({"prompt": "p", "response": " ".join(["word"] * 40)}) + "\n")
        extra = ["--label-words", "", "--prompt-template", ""]
    elif case == "no-template":
        model = tiny_llama_dir
    elif case == "gguf":
        monkeypatch.setenv("FEDLORA_CACHE_DIR", str(tmp_path / "cache"))
        model = tmp_path / "broken.gguf"
        model.write_bytes(b"nothing like a GGUF file")
    else:
        model = "minilm"
    out = tmp_path / "o"
    # Execute
    assert main(_args(model, data, out, *extra)) == 2
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedlora-sim: error: ") and message in err[0], err
    assert not out.exists()


def test_bad_input_keeps_earlier_results_even_with_overwrite(tiny_chat_llama_dir, tmp_path, capsys):
    # Prepare: a folder with results, and a file of unrecognizable columns
    out = tmp_path / "keep"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    # Execute
    code = main(_args(tiny_chat_llama_dir, odd, out, "--label-words", "", "--prompt-template", "",
                      "--overwrite"))
    # Assert: refused in one line before anything was replaced
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (out / "metrics.jsonl").read_text() == "precious\n"


def test_sft_dp_sgd_through_opacus_equals_the_batched_kernels(tiny_chat_llama_dir, sentiment_tsv, tmp_path):
    # Execute: the same DP-SGD sft job through fedlora's batched DP-SGD and through Opacus'
    # GradSampleModule and DPOptimizer (Opacus clips, sums and noises; the per-example gradients
    # of fedlora's layers come from fedlora's grad samplers, registered with Opacus)
    from safetensors.torch import load_file

    dp = ["--dp", "sample", "--epsilon", "8", "--delta", "1e-3", "--dp-reproducible", "--rounds", "1"]
    for backend in ("fedlora", "opacus"):
        out = tmp_path / backend
        assert main(_args(tiny_chat_llama_dir, sentiment_tsv, out, *dp, "--dp-backend", backend)) == 0
    # Assert: the same adapter (token-level losses, response-only labels, Poisson batches, noise)
    a = load_file(tmp_path / "fedlora" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "opacus" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().max()) <= 1e-6 for k in a)
    assert _rows(tmp_path / "opacus")[-1]["dp_backend"] == "opacus"
