"""Per-round overhead of fedlora-server + fedlora-client vs a stock Flower app, on loopback.

Both run the same federated LoRA job on Flower's deployment engine (one SuperLink,
two SuperNodes on this machine): same model, data (BBC News), rank, local steps,
batch and sequence length. Overhead of a round = its wall time minus the slowest
client's training time (the local steps only). The stock app
(``benchmarks/stock_flower``) is written the way Flower's LLM examples are: a new
ClientApp process per message that rebuilds the PEFT model; fedlora keeps one
process per client and its model warm.

Usage::

    python benchmarks/deploy_overhead.py                 # tiny random BERT (mechanics)
    python benchmarks/deploy_overhead.py --model minilm  # the real all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stats import read_rows

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def _popen(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def run_fedlora(args, model: str, work: Path, env: dict) -> list[dict]:
    """fedlora-server + 2 fedlora-clients; the metric rows of rounds ≥ 1."""
    port, out = args.port, work / "fedlora-out"
    clients = [_popen([str(BIN / "fedlora-client"), "--server", f"127.0.0.1:{port}", "--insecure",
                       "--partition-id", str(k), "--num-partitions", "2", "--quiet"],
                      work / f"fedlora-client{k}.log", env) for k in range(2)]
    try:
        server = subprocess.run(
            [str(BIN / "fedlora-server"), "--insecure", "--port", str(port), "--out", str(out),
             "--model", model, "--num-clients", "2", "--rounds", str(args.rounds), "--rank", str(args.rank),
             "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size),
             "--max-length", str(args.max_length), "--quiet"],
            env=env, capture_output=True, text=True, timeout=3600)
    finally:
        _stop(clients)
    if server.returncode != 0:
        raise SystemExit(f"fedlora-server failed: {server.stderr.strip()[-500:]}")
    rows = read_rows(out)
    return [{"round": r["round"], "seconds": r["seconds"], "client": r["client_seconds"]}
            for r in rows if r["round"] >= 1]


def run_stock(args, model: str, work: Path, env: dict) -> list[dict]:
    """flower-superlink + 2 flower-supernodes + ``flwr run`` of the stock app."""
    port = args.port + 1
    home = work / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = dict(env, FLWR_HOME=str(home))
    procs = [_popen([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                     "--port", str(port)], work / "stock-superlink.log", env)]
    time.sleep(3)
    procs += [_popen([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                      "--port", str(port + 10 + k), "--node-config", f"partition-id={k} num-partitions=2"],
                     work / f"stock-supernode{k}.log", env) for k in range(2)]
    time.sleep(3)
    config = (f"model='{model}' num-server-rounds={args.rounds} local-steps={args.local_steps}"
              f" batch-size={args.batch_size} rank={args.rank} max-length={args.max_length}")
    try:
        res = subprocess.run([str(BIN / "flwr"), "run", str(HERE / "stock_flower"), "bench", "--stream",
                              "--run-config", config], env=env, capture_output=True, text=True, timeout=3600)
    finally:
        _stop(procs)
    lines = [ln.split("STOCK_ROUND ", 1)[1] for ln in res.stdout.splitlines() if "STOCK_ROUND " in ln]
    if len(lines) < args.rounds:
        raise SystemExit(f"stock Flower run failed: {(res.stdout + res.stderr).strip()[-800:]}")
    return [{"round": d["round"], "seconds": d["seconds"], "client": d["client_train_seconds"]}
            for d in map(json.loads, lines)]


def summarize(name: str, rows: list[dict]) -> float:
    """Print every round; return the mean overhead of rounds ≥ 2 (round 1 loads models)."""
    for r in rows:
        print(f"  {name:8s} round {r['round']}: {r['seconds']:6.2f} s wall, {r['client']:6.2f} s client"
              f" training, overhead {r['seconds'] - r['client']:6.2f} s")
    steady = [r["seconds"] - r["client"] for r in rows if r["round"] >= 2] or \
             [r["seconds"] - r["client"] for r in rows]
    return statistics.mean(steady)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer BERT) or 'minilm'")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--port", type=int, default=8600)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deploy-overhead-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false")
    model = args.model
    if model == "tiny":
        sys.path.insert(0, str(HERE / "stock_flower"))
        from stock_flower_lora.task import make_tiny_bert

        model = make_tiny_bert(str(work / "tiny-bert"), num_labels=5)
    print(f"job: model {args.model}, BBC News, 2 clients on loopback, {args.rounds} rounds of"
          f" {args.local_steps} local steps × {args.batch_size} examples × {args.max_length} tokens,"
          f" LoRA rank {args.rank} on query/value; logs in {work}")
    ours = summarize("fedlora", run_fedlora(args, model, work, env))
    stock = summarize("stock", run_stock(args, model, work, env))
    print(f"per-round overhead (mean of rounds ≥ 2): fedlora {ours:.2f} s, stock Flower {stock:.2f} s,"
          f" ratio {stock / max(ours, 1e-9):.1f}x")


if __name__ == "__main__":
    main()
