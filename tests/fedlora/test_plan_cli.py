"""``fedlora-plan``: presets, ``--memory`` sizes, the printed plan and table, one-line refusals."""

from __future__ import annotations

import json

import pytest

from fedlora.job.schema import JobConfig
from fedlora.plan.cli import _largest, _run_total, main, parse_memory
from fedlora.plan.memory import plan_memory
from fedlora.plan.presets import PRESETS
from fedlora.plan.shape import build_shape
from fedlora.plan.traffic import RoundBytes
from fedlora.strategies import STRATEGIES


@pytest.mark.parametrize("preset, billions", [("llama-3.1-8b", 8.03), ("mistral-7b", 7.25),
                                              ("qwen2.5-7b", 7.62), ("smollm2-1.7b", 1.71)])
def test_presets_have_the_published_parameter_counts(preset, billions):
    shape = build_shape(JobConfig(model=preset, task="sft", rank=16))
    assert sum(t.numel for t in shape.base) / 1e9 == pytest.approx(billions, abs=0.005)
    assert set(PRESETS) == {"llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "smollm2-1.7b"}


@pytest.mark.parametrize("text, expected", [("24GB", 24 * 10**9), ("80GiB", 80 * 2**30), ("1.5 TB", 1.5e12),
                                            ("512MiB", 2**29), ("1000B", 1000)])
def test_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-9b"], "no model or planner preset called 'llama-9b': pass a local folder, a .gguf"
                              " file, 'minilm', 'smollm2' or a preset (llama-3.1-8b, mistral-7b, qwen2.5-7b,"
                              " smollm2-1.7b)"),
    (["--model", "llama-3.1-8b", "--task", "sft", "--memory", "24XB"],
     "--memory takes sizes like 24GB or 80GiB, got '24XB'"),
    (["--model", "llama-3.1-8b", "--task", "sft", "--memory", "8GB,0GB"], "--memory takes sizes like 24GB"),
    (["--model", "llama-3.1-8b", "--task", "sft", "--memory", "24"],
     "--memory 24 has no unit: write 24GB (10^9 bytes) or 24GiB (2^30 bytes)"),
    (["--model", "llama-3.1-8b", "--task", "sft", "--response-tokens", "0"], "--response-tokens must be ≥ 1"),
    (["--model", "llama-3.1-8b", "--task", "sft"], "a preset has none: pass --max-length (e.g. 512)"),
    # the quantized base's own flags, as a job checks them (a negative --fold-rank planned negative bytes)
    (["--model", "llama-3.1-8b", "--task", "sft", "--max-length", "64", "--quantize", "nf4", "--strategy",
      "flora", "--fold-rank", "-1"], "--fold-rank must be ≥ 1 (0: the whole residual, exactly), got -1"),
    (["--model", "llama-3.1-8b", "--task", "sft", "--max-length", "64", "--quant-correction", "8"],
     "--quant-correction corrects a quantized base's error, and without --quantize the base has none"),
    # the plan was made, then writing it was an IsADirectoryError / FileNotFoundError traceback
    (["--model", "llama-3.1-8b", "--task", "sft", "--max-length", "64", "--json", "/"],
     "--json '/' is a folder: pass a file path such as plan.json"),
    (["--model", "llama-3.1-8b", "--task", "sft", "--max-length", "64", "--json", "/no-such-folder/p.json"],
     "--json '/no-such-folder/p.json' is in no existing folder: pass a file path such as plan.json"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_plan_of_a_folder_prints_memory_and_every_strategys_traffic(tiny_llama_dir, tmp_path, capsys):
    # Execute
    out = tmp_path / "plan.json"
    assert main(["--model", str(tiny_llama_dir), "--task", "causal-lm", "--rank", "4", "--batch-size", "2",
                 "--max-length", "16", "--num-clients", "3", "--rounds", "2", "--memory", "1GB,80GiB",
                 "--json", str(out)]) == 0
    # Assert: the memory table, what fits, a traffic row per strategy, and the same in the JSON
    text = capsys.readouterr().out
    plan = json.loads(out.read_text())["plan"]
    assert "| **per client** |" in text and "80GiB: at most" in text
    assert set(plan["traffic"]) == set(STRATEGIES)
    for name in STRATEGIES:
        assert f"| `{name}` |" in text
        assert [r["round"] for r in plan["traffic"][name]] == [0, 1, 2]
    assert plan["fits"]["80GiB"] > plan["fits"]["1GB"] > 0
    assert plan["traffic"]["fedavg"][1]["up"] == plan["traffic"]["fedavg"][2]["up"]     # 3 clients' bytes
    assert plan["traffic"]["ffa-lora"][1]["up"][0] < plan["traffic"]["fedavg"][1]["up"][0]  # B only


def test_a_config_file_plans_the_same_job_as_its_flags(tiny_llama_dir, tmp_path, capsys):
    # Prepare: the job as a TOML file of run-config names
    config = tmp_path / "job.toml"
    config.write_text(f'model = "{tiny_llama_dir}"\ntask = "causal-lm"\nrank = 4\nbatch-size = 2\n'
                      'max-length = 16\nnum-clients = 3\nrounds = 2\n')
    flags = ["--model", str(tiny_llama_dir), "--task", "causal-lm", "--rank", "4", "--batch-size", "2",
             "--max-length", "16", "--num-clients", "3", "--rounds", "2"]
    # Execute
    assert main([*flags, "--json", str(tmp_path / "flags.json")]) == 0
    assert main(["--config", str(config), "--json", str(tmp_path / "file.json")]) == 0
    # Assert: the same job and plan
    by_flags, by_file = (json.loads((tmp_path / f).read_text()) for f in ("flags.json", "file.json"))
    assert by_file == by_flags
    capsys.readouterr()


def test_table_over_models(tiny_llama_dir, tmp_path, capsys):
    # Execute: the README's table for two models
    out = tmp_path / "table.json"
    argv = ["--models", f"llama-3.1-8b,{tiny_llama_dir}", "--task", "sft", "--quantize", "nf4", "--precision",
            "bf16", "--rank", "16", "--batch-size", "4", "--max-length", "512", "--device", "cuda",
            "--memory", "8GB,24GB,80GB", "--json", str(out)]
    assert main(argv) == 0
    # Assert: one row per model whose numbers are plan_memory's
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["plan"]
    assert [r["model"] for r in rows] == ["llama-3.1-8b", str(tiny_llama_dir)]
    assert text.count("| llama-3.1-8b | 8.03B |") == 1
    cfg = JobConfig(model="llama-3.1-8b", task="sft", quantize="nf4", precision="bf16", rank=16, batch_size=4,
                    max_length=512, device="cuda")
    mem = plan_memory(build_shape(cfg), cfg, 128)
    assert rows[0]["per_client"] == mem.per_client
    assert rows[0]["fits"]["80GB"][0] == mem.largest_pass(80 * 10**9) >= rows[0]["fits"]["24GB"][0]


def test_a_plan_beyond_the_positions_or_over_a_bad_model_prints_no_table(tiny_llama_dir, capsys):
    # one model: --max-length past its 64 positions is refused as a job refuses it (94.9 GiB planned before)
    assert main(["--model", str(tiny_llama_dir), "--task", "sft", "--max-length", "100000"]) == 2
    assert "exceeds the 64 positions this model takes" in capsys.readouterr().err
    # a table: every model read before a row; without --memory, no clients-per-pass cells
    assert main(["--models", "llama-3.1-8b,nope-7b", "--task", "sft", "--max-length", "512"]) == 2
    assert "| llama-3.1-8b" not in capsys.readouterr().out
    assert main(["--models", "llama-3.1-8b,mistral-7b", "--task", "sft", "--max-length", "512"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| llama"))
    assert row.count("|") == 6          # five cells: model, parameters, base, per client (off, on)


def test_an_attention_free_model_is_planned(tmp_path, capsys):
    # Prepare: a toy FNet classifier's config (Fourier mixing, no attention heads)
    from transformers import FNetConfig

    config = FNetConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    config.save_pretrained(tmp_path)
    out = tmp_path / "plan.json"
    # Execute
    code = main(["--model", str(tmp_path), "--task", "classification", "--target-modules", "all-linear",
                 "--max-length", "16", "--json", str(out)])
    # Assert: a plan with memory and traffic (dims() read num_attention_heads, which FNet lacks)
    plan = json.loads(out.read_text())["plan"]
    assert code == 0 and plan["per_client"] > 0 and plan["traffic"]["fedavg"][1]["up"]


def _traffic_table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| strategy |") or line.startswith("| `")]


def test_a_long_run_shows_its_first_rounds_the_rest_and_the_run(tiny_llama_dir, capsys):
    # Execute: 60 rounds of 3 of 6 clients, every strategy
    job = ["--task", "causal-lm", "--rank", "4", "--batch-size", "2", "--max-length", "16"]
    assert main(["--model", str(tiny_llama_dir), *job, "--num-clients", "6", "--clients-per-round", "3",
                 "--rounds", "60"]) == 0
    # Assert: rounds 0-3 one by one, rounds 4-60 in one column, the run's total: 6 columns a row
    head, *rows = _traffic_table(capsys.readouterr().out)
    assert head.split(" | ")[1:] == ["round 0", "round 1", "round 2", "round 3", "rounds 4–60, largest",
                                     "run of 60 rounds, most per client |"]
    assert len(rows) == len(STRATEGIES) and all(row.count(" | ") == 6 for row in rows)


def test_run_total_is_the_most_one_client_sends_over_the_rounds():
    # Prepare: client 1 in both rounds (5 + 7 up, 1 + 1 down), client 2 in one (9 up, 30 down)
    rows = [RoundBytes(1, [1, 2], [5, 9], [1, 30]), RoundBytes(2, [1], [7], [1])]
    # Execute / Assert: the largest totals, each over its own client
    assert _run_total(rows) == "↑ 12 B ↓ 30 B"
    assert _largest(rows[1:]) == "↑ 7 B ↓ 1 B" and _largest([RoundBytes(0, [], [], [])]) == "–"


@pytest.mark.parametrize("how", ["flag", "config"])
def test_a_named_strategy_is_planned_alone(how, tiny_llama_dir, tmp_path, capsys):
    # Prepare: the job's strategy named by the flag, or by a config file
    flags = ["--model", str(tiny_llama_dir), "--task", "causal-lm", "--rank", "4", "--batch-size", "2",
             "--max-length", "16", "--num-clients", "3", "--rounds", "2", "--json", str(tmp_path / "p.json")]
    config = tmp_path / "job.toml"
    config.write_text('strategy = "flora"\n')
    named = ["--strategy", "flora"] if how == "flag" else ["--config", str(config)]
    # Execute
    assert main([*flags, *named]) == 0
    # Assert: FLoRA's row alone, in the table and the JSON
    rows = _traffic_table(capsys.readouterr().out)[1:]
    assert [row.split(" | ")[0] for row in rows] == ["| `flora`"]
    assert list(json.loads((tmp_path / "p.json").read_text())["plan"]["traffic"]) == ["flora"]
