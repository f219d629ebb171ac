"""``benchmarks/llm_memory.py``: the shares of bf16's client step it prints (issue 28's ratio)."""

from __future__ import annotations

from bench_scripts import load_script

llm_memory = load_script("llm_memory", "bench_llm_memory")
MIB = 2**20


def _r(weights: int, rss_loaded: int, step_peak: int) -> dict:
    return {"weights": weights * MIB, "rss_loaded": rss_loaded * MIB, "step_peak": step_peak * MIB,
            "seconds": 1.0}


def test_each_base_is_set_against_bf16_of_the_same_task_and_checkpointing(capsys):
    results = {"sft/bf16/1": _r(250, 700, 150), "sft/nf4-bf16/1": _r(100, 600, 50),
               "sft/nf4-bf16/0": _r(100, 600, 500),   # no bf16 run without checkpointing: no row
               "causal-lm/bf16/0": _r(250, 700, 1000)}
    llm_memory.against_bf16(results)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sft")]
    # (100 + 50) / (250 + 150) = 37.5%; (600 + 50) / (700 + 150) = 76.5%
    assert rows == ["| sft | nf4-bf16 | on | 150 MiB | 37.5% | 76.5% |"]


def test_nothing_is_printed_without_a_bf16_measurement(capsys):
    llm_memory.against_bf16({"sft/nf4/1": _r(100, 600, 50)})
    assert capsys.readouterr().out == ""
