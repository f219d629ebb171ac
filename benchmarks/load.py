"""20 real clients on loopback, 30% of them SIGKILLed mid-run: does every round complete?

Starts ``fedlora-server`` and ``--clients`` ``fedlora-client`` processes (one partition of the job's
data each) on this machine, runs ``--rounds`` rounds of a tiny random BERT, and SIGKILLs the last
``--kill`` clients (process group and all) as soon as round ``--kill-round`` has started. It reports

* every round's wall time, clients aggregated, failed and rejected clients (a round needs half the
  clients that are never killed, ``--min-replies``);
* the peak resident memory of the server's process tree (``fedlora-server`` and every process
  below it: ``flwr run``, the SuperLink, the ServerApp), sampled every 0.2 s, and of one client's
  tree (``fedlora-client`` and its SuperNode);
* whether ``checkpoint.safetensors`` and ``metrics.jsonl`` hold every round;
* whether the final adapter equals a clean run over the survivors' rounds: the batched simulator
  replaying, round by round, exactly the clients whose replies the server aggregated (defined for
  strategies whose clients keep nothing between rounds, such as fedavg, the default).

Usage::

    python benchmarks/load.py                          # 20 clients, 6 killed in round 3 of 5
    python benchmarks/load.py --clients 4 --kill 1 --rounds 3     # a quick look (tested)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from stats import read_rows

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (by parent pid; children in their own sessions too:
    the SuperLink, the ServerApp)."""
    children: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_of_tree(root: int) -> tuple[int, int]:
    """``(total, largest)`` resident bytes of ``root`` and its descendants."""
    total = largest = 0
    for pid in descendants(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb = int(line.split()[1]) * 1024
                    total, largest = total + kb, max(largest, kb)
        except OSError:
            continue
    return total, largest


class PeakMemory(threading.Thread):
    """Samples the RSS of process trees every ``period`` seconds; keeps the peaks."""

    def __init__(self, trees: dict[str, list[int]], period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.trees, self.period = trees, period
        self.peak = {name: 0 for name in trees}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name, roots in self.trees.items():
                self.peak[name] = max(self.peak[name], *(rss_of_tree(r)[0] for r in roots))
            self.stop.wait(self.period)


def rows(out: Path) -> list[dict]:
    return read_rows(out) if (out / "metrics.jsonl").is_file() else []


def job_flags(args) -> list[str]:
    return ["--model", args.model, "--data", args.data, "--num-clients", str(args.clients),
            "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--batch-size", "8",
            "--max-length", "32", "--rank", "4", "--strategy", args.strategy, "--seed", "0"]


def launch(args, work: Path, env: dict) -> tuple[subprocess.Popen, list[subprocess.Popen]]:
    out = work / "run"
    server = subprocess.Popen(
        [str(BIN / "fedlora-server"), "--insecure", "--port", str(args.port), "--out", str(out),
         "--round-timeout", str(args.round_timeout),
         "--min-replies", str(max(1, (args.clients - args.kill) // 2)),
         "--quiet", *job_flags(args)],
        stdout=(work / "server.log").open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    clients = [subprocess.Popen(
        [str(BIN / "fedlora-client"), "--insecure", "--server", f"127.0.0.1:{args.port}", "--quiet",
         "--partition-id", str(k), "--num-partitions", str(args.clients), "--poll", "0.1"],
        stdout=(work / f"client{k}.log").open("wb"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True) for k in range(args.clients)]
    return server, clients


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def replay(args, got: list[dict], work: Path) -> bool | None:
    """The batched simulator over the same clients per round; None when not defined (a strategy
    whose clients keep state between rounds)."""
    import torch
    from safetensors.torch import load_file

    from fedlora.job.flags import to_config
    from fedlora.simulations.cli import build_parser
    from fedlora.simulations.engine import run
    from fedlora.strategies import STRATEGIES

    strategy = STRATEGIES[args.strategy]
    if strategy.adapter_plan.shared or strategy.adapter_plan.keep or strategy.folds:
        return None
    cfg = to_config(build_parser().parse_args([*job_flags(args), "--out", str(work / "replay")]))
    schedule = {r["round"]: r["client_ids"] for r in got if r["round"] >= 1}
    run(cfg, work / "replay", schedule=lambda rnd: schedule[rnd])
    a = load_file(work / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(work / "replay" / "adapter" / "adapter_model.safetensors")
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--kill", type=int, default=6, help="clients SIGKILLed (the last ones)")
    p.add_argument("--kill-round", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer BERT) or a model folder")
    p.add_argument("--data", default="bbcnews")
    p.add_argument("--round-timeout", type=float, default=300.0)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--work", type=Path, default=None, help="folder for logs and runs (default: a temp dir)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedlora-load-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.port == 0:
        from fedlora.net.tls import free_port

        args.port = free_port()
    if args.model == "tiny":
        sys.path.insert(0, str(HERE / "stock_flower"))
        from stock_flower_lora.task import make_tiny_bert

        args.model = make_tiny_bert(str(work / "tiny-bert"), num_labels=5)
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", FEDLORA_LEDGER_DIR=str(work / "ledgers"))
    t0 = time.monotonic()
    server, clients = launch(args, work, env)
    memory = PeakMemory({"server": [server.pid], "client": [c.pid for c in clients[:1]]})
    memory.start()
    killed_at = None
    try:
        while server.poll() is None:
            done = [r["round"] for r in rows(work / "run")]
            if killed_at is None and args.kill and done and max(done) >= args.kill_round - 1:
                # round kill_round is being sent out: its sampled clients die in it, before they reply
                for c in clients[args.clients - args.kill:]:
                    kill_group(c)
                killed_at = time.monotonic() - t0
            time.sleep(0.1)
    finally:
        memory.stop.set()
        for c in clients:
            kill_group(c, signal.SIGTERM)
    got = rows(work / "run")
    report(args, work, server.returncode, got, memory.peak, killed_at)
    return 0 if server.returncode == 0 else 1


def report(args, work: Path, code: int, got: list[dict], peak: dict, killed_at: float | None) -> None:
    from fedlora.rounds.checkpoint import load_checkpoint

    print(f"job: {args.clients} fedlora-client processes on loopback, {args.strategy}, tiny random BERT,"
          f" {args.rounds} rounds of {args.local_steps} local steps; {args.kill} clients SIGKILLed"
          f" at {killed_at or 0:.1f} s (round {args.kill_round}); logs in {work}")
    print(f"fedlora-server exit code {code}")
    print("| round | wall s | clients aggregated | failed | rejected |")
    print("|---|---|---|---|---|")
    for r in got[1:]:
        print(f"| {r['round']} | {r['seconds']:.1f} | {r['clients']} | {r['failed']} |"
              f" {len(r['rejected'])} |")
    ckpt = work / "run" / "checkpoint.safetensors"
    saved = load_checkpoint(ckpt)["round"] if ckpt.is_file() else None
    complete = [r["round"] for r in got] == list(range(args.rounds + 1)) and saved == args.rounds
    print(f"peak RSS: server tree {peak['server'] / 2**20:.0f} MiB, one client tree"
          f" {peak['client'] / 2**20:.0f} MiB")
    print(f"every round in metrics.jsonl and checkpoint.safetensors (round {saved}): {complete}")
    same = replay(args, got, work) if code == 0 else None
    print("final adapter = clean batched run over the same clients per round:",
          "not defined for this strategy" if same is None else same)


if __name__ == "__main__":
    sys.exit(main())
