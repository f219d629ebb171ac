"""SmolLM2 on CPU: peak memory and time per training step on an fp32, bf16, 4-bit or 8-bit base,
with and without gradient checkpointing, for language modelling and for instruction tuning, against
the memory ``fedlora-plan`` predicts for the same job (:mod:`fedlora.plan.memory`).

    python benchmarks/llm_memory.py [--model smollm2] [--batch 4] [--tokens 256] [--steps 3]
                                    [--response 4] [--bases fp32,bf16,nf4,int8] [--save FILE]
    python benchmarks/llm_memory.py --load FILE     # the tables again, from saved measurements

Each configuration runs in its own process (so one's memory does not count against
another): it builds the job's one-slot model exactly as a client does
(``fedlora.job.setup.build_model``: ``--precision bf16`` stores the frozen base in bfloat16,
``--quantize nf4|int8`` its block linear layers in bitsandbytes' 4 or 8 bits; :data:`BASES`),
trains LoRA r=8 on q_proj/v_proj for one warm-up step and ``--steps`` timed steps of
``batch × tokens`` tokens, with the loss on every token (``--task causal-lm``) or, as in
``--task sft``, on the last ``--response`` tokens of each row only (then only those positions'
logits are computed), and reports

* ``weights``: the bytes of the model's parameters and buffers (frozen base, adapters);
* ``RSS after load``: the process's resident memory once the model is built, every weight has
  been read once and glibc has returned the memory loading freed (``malloc_trim``); torch and
  transformers themselves take about 300 MiB. Without the read, the first step's peak would count
  the pages of an fp32 base still mapped from the safetensors file; without the trim, a step would
  reuse, unseen, the heap that loading (a quantized or bf16 base converts the fp32 weights) freed;
* ``step peak``: the peak resident memory while training (warm-up step included) minus the
  resident memory after the load: activations, logits, gradients and optimizer state (the
  peak counter is reset through ``/proc/self/clear_refs`` after the load). It also holds what
  glibc keeps of freed blocks, which moves from run to run;
* ``live peak``: the peak of the bytes that torch's allocator holds in tensors during two more
  steps (the second runs beside the optimizer's state), from the profiler's record of every
  allocation and free (``profile_memory``): the CPU's count of what
  ``torch.cuda.max_memory_allocated`` counts on a GPU, free of the allocator;
* ``planned``: ``fedlora-plan``'s weights and step memory for the same job (its resident figure,
  with the CPU allocator's fitted share, against the step peak; its live figure against the live
  peak), and their ratios to the measurements;
* ``s / step``: mean wall time of the timed steps.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

#: A configuration's frozen base: ``(--precision, --quantize)``. ``nf4`` and ``int8`` compute in
#: fp32 like the ``fp32`` row (``nf4-bf16`` is QLoRA's recipe: 4-bit blocks computed in bf16).
BASES = {"fp32": ("fp32", "none"), "bf16": ("bf16", "none"), "nf4": ("fp32", "nf4"),
         "nf4-bf16": ("bf16", "nf4"), "int8": ("fp32", "int8")}
TASKS = ("causal-lm", "sft")


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes (``VmRSS``, ``VmHWM``, ``RssAnon``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def live_peak(step: Callable[[], object]) -> int:
    """The most bytes held in tensors allocated during ``step()`` at once, from the profiler's
    allocation record (tensors that were alive before it are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def job(model: str, task: str, base: str, checkpointing: bool, batch: int, tokens: int):
    """The :class:`~fedlora.job.schema.JobConfig` of one configuration."""
    from fedlora.job.schema import JobConfig

    precision, quantize = BASES[base]
    return JobConfig(model=model, task=task, precision=precision, quantize=quantize,
                     gradient_checkpointing=checkpointing, batch_size=batch, max_length=tokens, local_steps=1,
                     lr=1e-3)


def child(model: str, task: str, base: str, checkpointing: bool, batch: int, tokens: int, steps: int,
          response: int) -> dict:
    import torch

    from fedlora.job.setup import build_model
    from fedlora.strategies import AdapterPlan
    from fedlora.training.train import ClientSampler, TrainConfig, train_clients

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = job(model, task, base, checkpointing, batch, tokens)
    fm, tok, _ = build_model(cfg, [cfg.rank], AdapterPlan())
    with torch.no_grad():  # page in weights still mapped from the safetensors file: they are the model's
        for t in [*fm.parameters(), *fm.buffers()]:
            t.sum()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what loading freed, or the step would reuse it unseen
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
    step_peak = _status("VmHWM") - before
    # each call builds its optimizer anew; the second step's backward pass runs beside its state, as
    # every later step's does
    train_cfg.local_steps = 2
    live = live_peak(lambda: train_clients(fm, data, [sampler], train_cfg))
    return {"weights": weights, "rss_loaded": rss_loaded, "step_peak": step_peak, "live_peak": live,
            "seconds": seconds}


def measure(args: argparse.Namespace) -> dict[str, dict]:
    """Every configuration, each in its own process: ``"task/base/ckpt"`` -> its figures."""
    results = {}
    for task in TASKS:
        for base in args.bases.split(","):
            for ckpt in (False, True):
                cmd = [sys.executable, __file__, "--child", task, base, "1" if ckpt else "0",
                       "--model", args.model, "--batch", str(args.batch), "--tokens", str(args.tokens),
                       "--steps", str(args.steps), "--response", str(args.response)]
                proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results[f"{task}/{base}/{int(ckpt)}"] = r
                print(f"  {task}, {base}, checkpointing {'on' if ckpt else 'off'}:"
                      f" step peak {r['step_peak'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    return results


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    """The measurements as a Markdown table, with the planner's prediction beside each."""
    from fedlora.plan.memory import predict_job

    print(f"{args.model}, LoRA r=8 q/v, batch {args.batch} × {args.tokens} tokens, {os.cpu_count()} CPUs;"
          f" causal-lm: loss on every token, sft: on the last {args.response} of each row; planned by"
          " fedlora-plan (fedlora.plan.memory)\n")
    print("| task | base | checkpointing | weights | planned | RSS after load | step peak | planned step |"
          " planned / measured | live peak | planned live | planned / live | s / step |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        task, base, ckpt = key.split("/")
        cfg = job(args.model, task, base, ckpt == "1", args.batch, args.tokens)
        plan = predict_job(cfg, response_tokens=args.response)
        step, live = plan.step_bytes, r.get("live_peak")  # measurements saved before the live reading lack it
        live_cells = (f"{live / 2**20:.0f} MiB | {plan.live_step_bytes / 2**20:.0f} MiB |"
                      f" {plan.live_step_bytes / live:.2f}") if live else "— | — | —"
        print(f"| {task} | {base} | {'on' if ckpt == '1' else 'off'} | {r['weights'] / 2**20:.0f} MiB |"
              f" {plan.weight_bytes / 2**20:.0f} MiB | {r['rss_loaded'] / 2**20:.0f} MiB |"
              f" {r['step_peak'] / 2**20:.0f} MiB | {step / 2**20:.0f} MiB | {step / r['step_peak']:.2f} |"
              f" {live_cells} | {r['seconds']:.2f} |", flush=True)
    against_bf16(results)


def against_bf16(results: dict[str, dict]) -> None:
    """Issue 28's ratio: each base's client step (its model's bytes plus the step's peak, resident and
    live; and the process's peak, which adds the ~440 MiB of torch and transformers) over bf16's, per
    task and checkpointing. Nothing without a bf16 measurement."""
    rows = []
    for key, r in results.items():
        task, base, ckpt = key.split("/")
        ref = results.get(f"{task}/bf16/{ckpt}")
        if ref is None or base == "bf16":
            continue
        mine = r["weights"] + r["step_peak"]
        model_step = mine / (ref["weights"] + ref["step_peak"])
        process = (r["rss_loaded"] + r["step_peak"]) / (ref["rss_loaded"] + ref["step_peak"])
        live = "—"
        if r.get("live_peak") and ref.get("live_peak"):  # measurements saved before the live reading lack it
            live = f"{(r['weights'] + r['live_peak']) / (ref['weights'] + ref['live_peak']):.1%}"
        rows.append(f"| {task} | {base} | {'on' if ckpt == '1' else 'off'} |"
                    f" {mine / 2**20:.0f} MiB | {model_step:.1%} | {live} | {process:.1%} |")
    if rows:
        print("\nagainst bf16, one run each: weights + step peak (resident), weights + live peak, and the"
              " process's peak (RSS after load + step peak)\n")
        print("| task | base | checkpointing | weights + step peak | / bf16's |"
              " weights + live peak / bf16's | process peak / bf16's |")
        print("|---|---|---|---:|---:|---:|---:|")
        print("\n".join(rows), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--response", type=int, default=4, help="sft rows: tokens of the response")
    p.add_argument("--bases", default="fp32,bf16,nf4,int8", help=f"comma list of {', '.join(BASES)}")
    p.add_argument("--save", type=Path, help="write the measurements to this JSON file")
    p.add_argument("--load", type=Path, help="report saved measurements instead of measuring")
    p.add_argument("--child", nargs=3, metavar=("TASK", "BASE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = child(args.model, args.child[0], args.child[1], args.child[2] == "1", args.batch, args.tokens,
                    args.steps, args.response)
        print(json.dumps(out))
        return 0
    if unknown := set(args.bases.split(",")) - set(BASES):
        raise SystemExit(f"unknown base {sorted(unknown)}; use {', '.join(BASES)}")
    if args.load:
        saved = json.loads(args.load.read_text())
        for key in ("model", "batch", "tokens", "response"):
            setattr(args, key, saved[key])
        results = saved["results"]
    else:
        results = measure(args)
        if args.save:
            args.save.write_text(json.dumps({"model": args.model, "batch": args.batch, "tokens": args.tokens,
                                             "response": args.response, "results": results}, indent=1))
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
