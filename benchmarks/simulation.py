"""One federated round three ways: fedlora batched, fedlora one client at a time, stock Flower.

The same job each way: BBC News, ``--clients`` clients all training in the round,
``--local-steps`` steps of ``--batch-size`` × ``--max-length`` tokens, LoRA rank ``--rank``
on query/value (FedAvg).

* **batched**: ``fedlora-sim``'s engine, every client of the round in one forward/backward
  over the shared frozen base (``--max-clients-per-pass`` passes if given).
* **one by one**: the same engine with one client per pass (what research code does).
* **stock Flower**: Flower's own simulation engine (Ray, one ClientApp call per client)
  running ``benchmarks/stock_flower``, a PEFT LoRA ClientApp written the way Flower's LLM
  examples write them (the model is rebuilt in every call).

Times are of the last of ``--rounds`` rounds (training plus aggregation; round 1 also
starts Ray and loads models). The **bare batched step** is one forward/backward/AdamW step
of the batched model on a fixed batch, divided by the number of clients: the floor the
end-to-end per-client step is compared with.

Usage::

    python benchmarks/simulation.py                       # CPU: 10 clients, MiniLM
    python benchmarks/simulation.py --device cuda --clients 100 --client-gpus 0.1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def job_config(args, **over):
    from fedlora.job.schema import JobConfig

    kw = dict(strategy="fedavg", model=args.model, num_clients=args.clients, rounds=args.rounds,
              local_steps=args.local_steps, batch_size=args.batch_size, rank=args.rank, lr=2e-3,
              max_length=args.max_length, device=args.device, seed=0)
    kw.update(over)
    return JobConfig(**kw)


def fedlora_round(args, work: Path, per_pass: int | None) -> float:
    """Seconds of the last round of fedlora's engine (training + aggregation)."""
    from fedlora.simulations.engine import run

    cfg = job_config(args, max_clients_per_pass=per_pass)
    rows = run(cfg, work / f"fedlora-{per_pass or 'all'}")
    return rows[-1]["seconds"]


def bare_step(args, repeats: int = 5) -> float:
    """Seconds per client of one batched forward/backward/AdamW step on a fixed batch."""
    from fedlora.kernels import Routing
    from fedlora.simulations.engine import build_job
    from fedlora.tasks import get_task

    job = build_job(job_config(args))
    fm, k, b = job.fm, job.fm.num_clients, args.batch_size
    device = next(fm.parameters()).device
    idx = torch.arange(k * b) % job.train["labels"].shape[0]
    batch = {n: t.index_select(0, idx).to(device) for n, t in job.train.items()}
    labels = batch.pop("labels")
    routing = Routing.segments(torch.arange(k, device=device), b)
    opt = torch.optim.AdamW(fm.trainable_parameters(), lr=2e-3)
    fm.train()
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        loss = get_task("classification").client_losses(fm(routing=routing, **batch).logits, labels, k).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / k


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stock_round(args, work: Path, env: dict) -> dict:
    """The last round of the stock app on Flower's simulation engine (its STOCK_ROUND line)."""
    from fedlora.net.tls import free_port
    from fedlora.server.launch import SuperLink, tool, write_connection

    home, port = work / "flwr-home", free_port()
    write_connection(home, f"127.0.0.1:{port}", None)
    env = dict(env, FLWR_HOME=str(home))
    link = SuperLink(["--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port)],
                     work / "stock-superlink.log", env)
    config = (f"model='{args.model}' num-server-rounds={args.rounds} local-steps={args.local_steps}"
              f" batch-size={args.batch_size} rank={args.rank} max-length={args.max_length}"
              f" min-nodes={args.clients}")
    fed = (f"num-supernodes={args.clients} client-resources-num-cpus={args.client_cpus}"
           f" client-resources-num-gpus={args.client_gpus}")
    try:
        link.wait_ready("127.0.0.1", port)
        res = subprocess.run([tool("flwr"), "run", str(HERE / "stock_flower"), "fedlora", "--stream",
                              "--run-config", config, "--federation-config", fed], env=env,
                             capture_output=True, text=True, timeout=7200)
    finally:
        link.stop()
    lines = [ln.split("STOCK_ROUND ", 1)[1] for ln in res.stdout.splitlines() if "STOCK_ROUND " in ln]
    if len(lines) < args.rounds:
        raise SystemExit(f"stock Flower simulation failed: {(res.stdout + res.stderr).strip()[-800:]}"
                         f" (logs in {work})")
    return json.loads(lines[-1])


def stock_missing() -> str | None:
    """Why the stock leg cannot run on Flower's simulation engine here (None if it can)."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed"
    try:
        from fedlora.errors import UserError
        from fedlora.server.launch import tool
    except ImportError as exc:  # deployment's extras (the SuperLink's web stack) are absent
        return f"fedlora's deployment cannot be imported ({exc})"
    try:
        tool("flwr")
    except UserError:
        return "no flwr command"
    return None


def stock_parts(args, calls: int) -> dict:
    """The stock ClientApp's work per call, measured without Flower or Ray (median of ``calls``).

    One call rebuilds the PEFT model and loads the global weights (``build``), tokenizes its
    partition (``data``; the app caches it, so later rounds of the same process skip it), trains
    ``--local-steps`` steps (``train``) and copies the weights back (counted in ``train``).
    """
    sys.path.insert(0, str(HERE / "stock_flower"))
    from stock_flower_lora import task

    path = task.resolve_model_path(args.model, 5)
    device = torch.device(args.device)
    glob = task.get_weights(task.build_model(path, 5, args.rank, 16.0))
    parts = {"build": [], "data": [], "train": []}
    for pid in range(calls):
        t0 = time.perf_counter()
        model = task.build_model(path, 5, args.rank, 16.0).to(device)
        task.set_weights(model, glob)
        t1 = time.perf_counter()
        data = task.load_partition(path, pid, args.clients, args.max_length)
        t2 = time.perf_counter()
        task.train(model, data, args.local_steps, args.batch_size, 2e-3, seed=pid)
        _ = {k: v.detach().cpu() for k, v in task.get_weights(model).items()}
        _sync(device)
        t3 = time.perf_counter()
        for key, sec in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[key].append(sec)
    return {key: statistics.median(v) for key, v in parts.items()}


def stock_estimate(args, calls: int) -> list[tuple[str, float]]:
    """Rows for the stock leg estimated from :func:`stock_parts`, printed with their parts."""
    parts = stock_parts(args, calls)
    per_call = sum(parts.values())
    at_once = max(1, int(1 / args.client_gpus)) if args.client_gpus > 0 else 1
    print(f"stock Flower estimated from its measured parts (median of {calls} calls, no Flower engine):"
          f" build {parts['build']:.2f} s + data {parts['data']:.2f} s + train {parts['train']:.2f} s"
          " per call")
    rows = [("stock est. sequential", args.clients * per_call)]
    if at_once > 1:  # Ray would run up to 1/client-gpus calls on the GPU at once: a lower bound
        rows.append((f"stock est. {at_once} at once", args.clients * per_call / min(at_once, args.clients)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="'minilm' or a local model folder")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-clients-per-pass", type=int, default=None)
    p.add_argument("--client-cpus", type=int, default=1, help="stock Flower: CPUs per client call")
    p.add_argument("--client-gpus", type=float, default=0.0, help="stock Flower: GPU share per call")
    p.add_argument("--skip-stock", action="store_true", help="only the two fedlora ways")
    p.add_argument("--stock-parts", type=int, default=0, metavar="CALLS",
                   help="estimate the stock leg from CALLS measured client calls instead of running Flower's"
                        " engine (automatic, with 3 calls, when flwr or Ray is missing)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false")
    work = Path(tempfile.mkdtemp(prefix="sim-bench-"))
    steps = args.clients * args.local_steps
    print(f"job: model {args.model}, BBC News, {args.clients} clients per round, {args.local_steps} local"
          f" steps of {args.batch_size} x {args.max_length} tokens, LoRA r={args.rank} on query/value,"
          f" FedAvg, last of {args.rounds} rounds; device {args.device}, torch {torch.__version__},"
          f" threads {torch.get_num_threads()}; logs in {work}", flush=True)
    bare = bare_step(args)
    batched = fedlora_round(args, work, args.max_clients_per_pass)
    single = fedlora_round(args, work, 1)
    rows = [("fedlora batched", batched), ("fedlora one by one", single)]
    missing = None if args.skip_stock or args.stock_parts else stock_missing()
    if missing:
        print(f"stock Flower's engine cannot run here ({missing}): its leg is estimated from its parts")
    stock = None
    if args.stock_parts or missing:
        rows += stock_estimate(args, args.stock_parts or 3)
    elif not args.skip_stock:
        stock = stock_round(args, work, env)
        rows.append(("stock Flower sim", stock["seconds"]))
    print(f"{'way':22s} {'s/round':>9s} {'ms/client-step':>15s} {'batched is x faster':>20s}")
    for name, sec in rows:
        print(f"{name:22s} {sec:9.2f} {1e3 * sec / steps:15.1f} {sec / batched:19.1f}x")
    print(f"bare batched step: {1e3 * bare:.1f} ms per client; end-to-end batched per-client step is"
          f" {batched / steps / bare:.2f}x the bare step")
    if stock is not None:
        print(f"stock Flower, slowest client: build {stock['client_build_seconds']:.2f} s,"
              f" data {stock['client_data_seconds']:.2f} s, train {stock['client_train_seconds']:.2f} s")


if __name__ == "__main__":
    main()
