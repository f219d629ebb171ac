"""How much one batched forward/backward should hold: the measurements behind ``pass_size``.

``simulations.engine.pass_size`` decides how many of a round's clients train in one pass.

* **CPU** (``--device cpu``): time per token of one training step (forward, backward, AdamW)
  of the batched model over passes of ``K`` clients × ``--batch-size`` rows × ``--tokens``
  tokens, for each ``K`` in ``--clients``. Prints ms per 1,000 tokens, the ratio to the fastest
  pass and the tokens per pass of the fastest; ``engine.CPU_PASS_TOKENS`` is set from it (the
  CPU default is chosen by tokens per pass, not by clients).
* **GPU** (``--device cuda``): the peak memory of one step (``torch.cuda.max_memory_allocated``
  above the loaded model) at each ``K``, against ``fedlora-plan``'s estimate of the same step
  (:func:`fedlora.plan.memory.plan_memory`, which ``engine.pass_size`` fills
  ``engine.GPU_MEMORY_SHARE`` of the free memory with): each client's gradients, optimizer state
  and activations, plus one dequantized layer of a ``--quantize`` base.

``--task sft --model FOLDER`` measures a causal LM the same way (loss on the last
``--response`` tokens of each row, as ``--task sft`` trains): on a GPU this is the SmolLM2 SFT
step of ``benchmarks/gpu_suite.py``, in bf16 and over a 4-bit base (``--quantize nf4``). Rows are
random token ids (time and memory do not depend on the values); every figure is the median of
``--steps`` steps after one warm-up step.

Usage::

    python benchmarks/pass_size.py --device cpu --clients 1,2,5,10,25,50,100
    python benchmarks/pass_size.py --device cuda --clients 1,8,32
    python benchmarks/pass_size.py --device cuda --task sft --model smollm2 --clients 1,4 --tokens 256
    python benchmarks/pass_size.py --device cuda --task sft --model smollm2 --clients 1,4 --tokens 256 \
        --precision bf16 --quantize nf4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fedlora.job.schema import JobConfig
from fedlora.job.setup import build_model
from fedlora.plan.memory import predict_job
from fedlora.simulations.engine import CPU_PASS_TOKENS, GPU_MEMORY_SHARE
from fedlora.strategies import AdapterPlan
from fedlora.training.train import ClientSampler, TrainConfig, train_clients


def batch(fm, tokenizer, task: str, rows: int, tokens: int, response: int) -> dict[str, torch.Tensor]:
    """``rows`` random rows of ``tokens`` ids, with the task's labels."""
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    ids = torch.randint(100, vocab - 100, (rows, tokens), generator=g)
    if task == "sft":
        labels = ids.clone()
        labels[:, :tokens - response] = -100  # the prompt carries no loss
    else:
        labels = torch.randint(0, fm.model.config.num_labels, (rows,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def measure(args: argparse.Namespace, clients: int) -> dict:
    """Seconds per step and peak step memory of one pass of ``clients`` clients."""
    cfg = job(args)
    t0 = time.perf_counter()
    fm, tokenizer, _ = build_model(cfg, [cfg.rank] * clients, AdapterPlan(), num_labels=2)
    print(f"  built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    rows = clients * args.batch_size
    data = batch(fm, tokenizer, args.task, rows, args.tokens, args.response)  # on the CPU, as a job's
    samplers = [ClientSampler(range(k * args.batch_size, (k + 1) * args.batch_size), seed=k)
                for k in range(clients)]
    train_cfg = TrainConfig.from_job(cfg)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        train_clients(fm, data, samplers, train_cfg)
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    del fm, data
    if cuda:
        torch.cuda.empty_cache()
    return {"clients": clients, "tokens": rows * args.tokens, "seconds": statistics.median(times),
            "peak": peak}


def report_cpu(results: list[dict]) -> None:
    best = min(results, key=lambda r: r["seconds"] / r["tokens"])
    print("| clients | rows | tokens / pass | s / step | ms / 1k tokens | vs fastest |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        per = 1e3 * r["seconds"] / r["tokens"] * 1e3
        ratio = (r["seconds"] / r["tokens"]) / (best["seconds"] / best["tokens"])
        print(f"| {r['clients']} | {r['rows']} | {r['tokens']} | {r['seconds']:.2f} | {per:.1f} |"
              f" {ratio:.2f}x |")
    print(f"fastest per token: {best['tokens']} tokens per pass ({best['clients']} clients);"
          f" engine.CPU_PASS_TOKENS is {CPU_PASS_TOKENS}")


def report_gpu(results: list[dict], args: argparse.Namespace) -> None:
    """Each pass's measured peak against ``fedlora-plan``'s: ``K`` clients' step memory plus one
    dequantized layer (the model and its slots were loaded before the peak counter started)."""
    plan = predict_job(job(args), response_tokens=args.response, num_labels=2)
    step = plan.per_client - plan.adapter
    print("| clients | tokens / pass | s / step | ms / client-step | peak step memory | planned |"
          " planned / measured |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        per_client = 1e3 * r["seconds"] / r["clients"]
        planned = r["clients"] * step + plan.transient
        print(f"| {r['clients']} | {r['tokens']} | {r['seconds']:.3f} | {per_client:.1f} |"
              f" {r['peak'] / 2**20:.0f} MiB | {planned / 2**20:.0f} MiB | {planned / r['peak']:.2f} |")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        slope = (hi["peak"] - lo["peak"]) / (hi["clients"] - lo["clients"])
        print(f"measured: {slope / 2**20:.1f} MiB per client; planned: {step / 2**20:.1f} MiB per client"
              f" ({step / slope:.2f}x); engine.pass_size fills {GPU_MEMORY_SHARE:.0%} of the free memory"
              " with the plan")


def job(args: argparse.Namespace) -> JobConfig:
    """The job of one pass (its rank, targets and optimizer are the defaults)."""
    return JobConfig(model=args.model, task=args.task, batch_size=args.batch_size, max_length=args.tokens,
                     local_steps=1, lr=1e-3, device=args.device, precision=args.precision,
                     quantize=args.quantize, quant_correction=args.quant_correction)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="classification", choices=["classification", "sft"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--quantize", default="none", choices=["none", "nf4", "fp4", "int8"],
                   help="a 4- or 8-bit base (bitsandbytes), as --quantize does")
    p.add_argument("--quant-correction", type=int, default=0,
                   help="with --quantize: its frozen rank-N correction, as --quant-correction builds it")
    p.add_argument("--clients", default="1,2,5,10,25,50,100", help="clients per pass, comma-separated")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--response", type=int, default=4, help="--task sft: tokens of each row's response")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    ks = sorted(int(k) for k in args.clients.split(","))
    corr = f" --quant-correction {args.quant_correction}" if args.quant_correction else ""
    print(f"pass size: {args.model} ({args.task}, {args.precision}, --quantize {args.quantize}{corr}),"
          f" LoRA r=8, {args.batch_size} rows × {args.tokens} tokens per client, device {args.device},"
          f" torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    results = []
    for k in ks:
        r = measure(args, k)
        r["rows"] = k * args.batch_size
        results.append(r)
        print(f"  {k} clients: {r['seconds']:.3f} s / step", file=sys.stderr, flush=True)
    if args.device.startswith("cuda"):
        report_gpu(results, args)
    else:
        report_cpu(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
