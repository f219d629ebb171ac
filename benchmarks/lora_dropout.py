"""What ``--lora-dropout`` costs a training pass: its hashed masks (``fedlora.kernels.dropout``).

Builds the job of ``fedlora-sim``'s defaults (MiniLM, BBC News) once per setting and times
``--steps`` local steps of one pass of clients (as many as the CPU default's
``--max-clients-per-pass`` fills), alternating P = 0 and ``--p`` ``--repeats`` times, and prints the
ratio of the medians. Prints, asserts nothing.

Usage::

    python benchmarks/lora_dropout.py [--p 0.1] [--steps 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from fedlora.job.flags import to_config
from fedlora.simulations.cli import build_parser
from fedlora.simulations.engine import build_job
from fedlora.training.train import TrainConfig, train_clients


def pass_seconds(p: float, steps: int, out: str) -> float:
    """Seconds of ``steps`` local steps of one pass of clients at dropout ``p``."""
    cfg = to_config(build_parser().parse_args(["--lora-dropout", str(p), "--out", out]), device="cpu")
    job = build_job(cfg)
    tc = replace(TrainConfig.from_job(cfg), local_steps=steps)
    t0 = time.perf_counter()
    train_clients(job.fm, job.train, job.samplers[:job.fm.num_clients], tc, rnd=1)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-lora-dropout")
    args = parser.parse_args()
    torch.manual_seed(0)
    pass_seconds(0.0, 1, args.out)  # warm-up: imports, the model's first load
    times: dict[float, list[float]] = {0.0: [], args.p: []}
    for _ in range(args.repeats):
        for p in times:
            times[p].append(pass_seconds(p, args.steps, args.out))
    base, drop = (statistics.median(times[p]) for p in times)
    print(f"{args.steps} steps of one pass, median of {args.repeats}: P=0 {base:.2f} s,"
          f" P={args.p:g} {drop:.2f} s, ratio {drop / base:.2f}")


if __name__ == "__main__":
    main()
