"""SmolLM2 on CPU: peak memory and time per training step, fp32 vs bf16, with and without
gradient checkpointing, for language modelling and for instruction tuning.

    python benchmarks/llm_memory.py [--model smollm2] [--batch 4] [--tokens 256] [--steps 3]
                                    [--response 4]

Each configuration runs in its own process (so one's memory does not count against
another): it builds the job's one-slot model exactly as a client does
(``fedlora.job.setup.build_model``: ``--precision bf16`` stores the frozen base in bfloat16),
trains LoRA r=8 on q_proj/v_proj for one warm-up step and ``--steps`` timed steps of
``batch × tokens`` tokens, with the loss on every token (``--task causal-lm``) or, as in
``--task sft``, on the last ``--response`` tokens of each row only (then only those positions'
logits are computed), and reports

* ``weights``: the bytes of the model's parameters and buffers (frozen base, adapters);
* ``RSS after load``: the process's resident memory once the model is built (torch and
  transformers themselves take about 300 MiB; an fp32 base may stay partly a mapping of the
  safetensors file);
* ``step peak``: the peak resident memory while training (warm-up step included) minus the
  resident memory after the load: activations, logits, gradients and optimizer state (the
  peak counter is reset through ``/proc/self/clear_refs`` after the load);
* ``s / step``: mean wall time of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes (``VmRSS``, ``VmHWM``, ``RssAnon``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(model: str, task: str, precision: str, checkpointing: bool, batch: int, tokens: int, steps: int,
          response: int) -> dict:
    import torch

    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import build_model
    from fedlora.strategies import AdapterPlan
    from fedlora.training.train import ClientSampler, TrainConfig, train_clients

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = JobConfig(model=model, task=task, precision=precision, gradient_checkpointing=checkpointing,
                    batch_size=batch, max_length=tokens, local_steps=1, lr=1e-3)
    fm, tok, _ = build_model(cfg, [cfg.rank], AdapterPlan())
    rss_loaded = _status("VmRSS")
    weights = sum(t.numel() * t.element_size() for t in [*fm.parameters(), *fm.buffers()])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, tok.vocab_size - 100, (batch, tokens), generator=g)
    labels = ids.clone()
    if task == "sft":  # the prompt's tokens carry no loss
        labels[:, :tokens - response] = -100
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    sampler = ClientSampler(range(batch), seed=0)
    train_cfg = TrainConfig.from_job(cfg)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status("VmRSS")
    train_clients(fm, data, [sampler], train_cfg)  # warm-up
    train_cfg.local_steps = steps
    t0 = time.perf_counter()
    train_clients(fm, data, [sampler], train_cfg)
    seconds = (time.perf_counter() - t0) / steps
    return {"weights": weights, "rss_loaded": rss_loaded, "step_peak": _status("VmHWM") - before,
            "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--response", type=int, default=4, help="sft rows: tokens of the response")
    p.add_argument("--child", nargs=3, metavar=("TASK", "PRECISION", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = child(args.model, args.child[0], args.child[1], args.child[2] == "1", args.batch, args.tokens,
                    args.steps, args.response)
        print(json.dumps(out))
        return 0
    print(f"{args.model}, LoRA r=8 q/v, batch {args.batch} × {args.tokens} tokens, {os.cpu_count()} CPUs;"
          f" causal-lm: loss on every token, sft: on the last {args.response} of each row\n")
    print("| task | base | checkpointing | weights | RSS after load | step peak | s / step |")
    print("|---|---|---|---:|---:|---:|---:|")
    results = {}
    for task in ("causal-lm", "sft"):
        for precision in ("fp32", "bf16"):
            for ckpt in (False, True):
                cmd = [sys.executable, __file__, "--child", task, precision, "1" if ckpt else "0",
                       "--model", args.model, "--batch", str(args.batch), "--tokens", str(args.tokens),
                       "--steps", str(args.steps), "--response", str(args.response)]
                proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
                r = results[(task, precision, ckpt)] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"| {task} | {precision} | {'on' if ckpt else 'off'} | {r['weights'] / 2**20:.0f} MiB |"
                      f" {r['rss_loaded'] / 2**20:.0f} MiB | {r['step_peak'] / 2**20:.0f} MiB |"
                      f" {r['seconds']:.2f} |", flush=True)
    base = results[("causal-lm", "fp32", False)]
    print()
    for (task, precision, ckpt), r in results.items():
        print(f"{task}, {precision}, checkpointing {'on' if ckpt else 'off'}:"
              f" weights {r['weights'] / base['weights']:.2f}x,"
              f" step peak {r['step_peak'] / base['step_peak']:.2f}x,"
              f" time {r['seconds'] / base['seconds']:.2f}x of causal-lm fp32 without checkpointing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
