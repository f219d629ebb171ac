"""Folding strategies over a 4-bit SmolLM2: exact aggregates, and the export answers as fedlora does.

    python benchmarks/quantized_folds.py [--strategies flora,fedex-lora] [--rounds 5] [--prompts 32]

FLoRA and FedEx-LoRA fold each round's update into the frozen base. A bitsandbytes base is never
requantized: the folds are kept as an exact low-rank residual beside it (``fold_U``, ``fold_V``
of :class:`fedlora.models.lora.BatchedLoRALinear`). For each strategy this runs the job
(SmolLM2-135M-Instruct, ``--quantize nf4``, ``--task sft`` on SST-2 phrases, 3 clients,
``--rounds`` rounds of 2 local steps of 4 examples, LoRA r = 4 on q_proj/v_proj), then

* prints every round's ``agg_error`` (the aggregate against the exact mean of the clients'
  products; the goal is ≤ 1e-6 in every round) and the residual's rank per layer;
* exports the adapter for PEFT (the residual rides as extra LoRA rank), loads it with
  ``PeftModel.from_pretrained`` onto a freshly loaded nf4 SmolLM2, and compares the greedy answers
  (token ids) of ``--prompts`` dev prompts with those of fedlora's global model.

Prints a Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fedlora.models.export import export_peft
from fedlora.models.hub import load_model
from fedlora.simulations.cli import build_parser, check_args
from fedlora.simulations.engine import train

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}"


def flags(args: argparse.Namespace, strategy: str) -> list[str]:
    return ["--task", "sft", "--model", "smollm2", "--quantize", "nf4", "--data",
            str(args.sst2 / "train.tsv"), "--text-column", "sentence", "--label-words",
            "0=negative,1=positive", "--prompt-template", PROMPT, "--test-data",
            str(args.sst2 / "dev.tsv"), "--test-text-column", "content",
            "--eval-max", str(args.prompts), "--num-clients", "3", "--rounds", str(args.rounds),
            "--local-steps", "2", "--batch-size", "4", "--rank", "4", "--max-length", "96",
            "--strategy", strategy, "--seed", "0", "--quiet", "--overwrite"]


def greedy(model, prompts: list[torch.Tensor], pad: int) -> list[list[int]]:
    """Each prompt's greedy continuation (6 new tokens), as token ids."""
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": pad}
    with torch.no_grad():
        return [model.generate(input_ids=p, attention_mask=torch.ones_like(p), **kw)[0].tolist()
                for p in prompts]


def one(args: argparse.Namespace, strategy: str) -> str:
    """Run, export, reload with PEFT; the table row."""
    from peft import PeftModel

    out = args.out / strategy
    t0 = time.perf_counter()
    cfg = check_args(build_parser().parse_args([*flags(args, strategy), "--out", str(out)]))
    job, coord = train(cfg, out)
    rows = coord.rows
    seconds = time.perf_counter() - t0
    errors = [r["agg_error"] for r in rows[1:]]
    ranks = sorted({int(layer.fold_U.shape[1]) for layer in job.fm.adapters.values()})
    pad = job.test.tokenizer.pad_token_id
    prompts = [torch.tensor([p]) for p in job.test.prompts[:args.prompts]]
    ours = greedy(job.fm, prompts, pad)
    adapter = export_peft(coord.state, list(job.fm.adapters), out / "peft", job.cfg.model, "CAUSAL_LM", [])
    base = load_model("smollm2", "causal-lm", quantize="nf4")[0]
    peft = greedy(PeftModel.from_pretrained(base, adapter).eval(), prompts, pad)
    same = sum(a == b for a, b in zip(ours, peft, strict=True))
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    acc = " / ".join(f"{r['answer_accuracy']:.0%}" for r in rows)
    worst = max(e for e in errors if e is not None)
    return (f"| {strategy} | {' '.join(f'{e:.1e}' for e in errors)} | {worst:.1e} | {ranks} | {rank} |"
            f" {same}/{len(prompts)} | {acc} | {seconds:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sst2", type=Path, default=SST2)
    p.add_argument("--strategies", default="flora,fedex-lora")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("runs/quantized-folds"))
    args = p.parse_args(argv)
    print("| strategy | agg_error per round | max | residual rank per layer | PEFT export rank |"
          " same greedy answers (PEFT on a fresh nf4 base) | answer acc per round | s |")
    print("|---|---|---:|---|---:|---:|---|---:|")
    for strategy in args.strategies.split(","):
        print(one(args, strategy), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
