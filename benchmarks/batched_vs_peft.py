"""Per-client training-step time: fedlora's batched module vs PEFT LoRA one client at a time.

Both sides train the same K clients on the same data (same model, rank, target layers,
batch, tokens, AdamW). fedlora runs all K clients in one forward/backward per step;
PEFT runs each client's own ``get_peft_model`` copy in turn. Model construction is not
timed on either side (only the steps), after one warm-up step each.

Usage::

    python benchmarks/batched_vs_peft.py                 # CPU defaults
    python benchmarks/batched_vs_peft.py --device cuda --clients 8 32 --batch 32 --tokens 128
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _data(n: int, tokens: int, vocab: int, num_labels: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, vocab, (n, tokens), generator=g),
            "attention_mask": torch.ones(n, tokens, dtype=torch.long),
            "labels": torch.randint(0, num_labels, (n,), generator=g)}


def time_batched(base, data, k: int, args) -> float:
    """Seconds per client step for K clients batched."""
    from fedlora.models.model import AdapterConfig, FederatedModel
    from fedlora.training.train import ClientSampler, TrainConfig, train_clients

    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[args.rank] * k, alpha=16.0))
    fm.reset_adapters(0)
    fm.to(args.device)
    n = data["labels"].shape[0]
    samplers = [ClientSampler(range(n), seed=i) for i in range(k)]
    warm = TrainConfig(local_steps=1, batch_size=args.batch, lr=1e-3)
    train_clients(fm, data, samplers, warm)
    cfg = TrainConfig(local_steps=args.steps, batch_size=args.batch, lr=1e-3)
    _sync(args.device)
    t0 = time.perf_counter()
    train_clients(fm, data, samplers, cfg)
    _sync(args.device)
    return (time.perf_counter() - t0) / (args.steps * k)


def time_peft(base, data, k: int, args) -> float:
    """Seconds per client step for K PEFT LoRA clients trained one after another."""
    from peft import LoraConfig, get_peft_model

    models = []
    for _ in range(k):
        m = get_peft_model(copy.deepcopy(base), LoraConfig(
            task_type="SEQ_CLS", r=args.rank, lora_alpha=16, lora_dropout=0.0,
            target_modules=["query", "value"])).to(args.device)
        m.eval()   # same as fedlora: no dropout in the frozen base
        models.append((m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)))
    g = torch.Generator().manual_seed(1)
    n = data["labels"].shape[0]

    def step(model, opt):
        idx = torch.randint(0, n, (args.batch,), generator=g)
        batch = {key: v[idx].to(args.device) for key, v in data.items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for model, opt in models:
        step(model, opt)
    _sync(args.device)
    t0 = time.perf_counter()
    for model, opt in models:          # each client's local steps, one client at a time
        for _ in range(args.steps):
            step(model, opt)
    _sync(args.device)
    return (time.perf_counter() - t0) / (args.steps * k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    p.add_argument("--batch", type=int, default=8, help="examples per client per step")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    from fedlora.models.hub import load_model

    base, _, path, _ = load_model("minilm", "sequence-classification", num_labels=5)
    data = _data(256, args.tokens, 30000, 5)
    print(f"model: all-MiniLM-L6-v2 ({path.name}), LoRA r={args.rank} on query/value + head,"
          f" batch {args.batch}x{args.tokens} tokens per client, {args.steps} timed steps,"
          f" device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'clients':>7} {'batched ms/client-step':>23} {'PEFT ms/client-step':>20} {'speed-up':>9}")
    for k in args.clients:
        tb = time_batched(base, data, k, args)
        tp = time_peft(base, data, k, args)
        print(f"{k:>7} {tb * 1e3:>23.1f} {tp * 1e3:>20.1f} {tp / tb:>8.2f}x")


if __name__ == "__main__":
    main()
