"""``fedlora-plan``'s traffic replay of a long run: rounds of the same shapes counted once, against
every round counted (and aggregated over the growing sum of FLoRA's and FedEx-LoRA's folds), as it
was before 2026-12-05 (85 s for every strategy at 200 rounds of a small model; the sum of the folds
grows every round, so FedEx-LoRA's replay of SmolLM2-1.7B took 3.4 s a round at 200 rounds, against
41 ms now: replaying every round takes minutes, hence 40 rounds by default).

Prints, per strategy, the seconds per round each way and their ratio, and checks that both count the
same bytes. The model is a config-only preset (no weight is read).

Usage::

    python benchmarks/plan_rounds.py [--model smollm2-1.7b] [--rounds 40]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from fedlora.job.schema import JobConfig
from fedlora.plan import traffic
from fedlora.plan.shape import build_shape
from fedlora.strategies import STRATEGIES


def every_round(self: traffic.Replay, key: tuple, count):
    """:meth:`traffic.Replay._seen` counting afresh each time."""
    return count()


def with_folds(self: traffic.Replay, clients: list[int]):
    """:meth:`traffic.Replay._aggregate` over the state as it is, its sum of folds included."""
    agg = self.strategy.aggregate([self._upload(c) for c in clients], self.state)
    return agg.state, (self._full(agg.fold) if agg.fold else {})


def timed(cfg: JobConfig, shape) -> tuple[float, list]:
    t0 = time.perf_counter()
    rows = traffic.plan_traffic(cfg, shape.layers, shape.heads)
    return time.perf_counter() - t0, [(r.clients, r.up, r.down) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-1.7b")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    base = JobConfig(model=args.model, task="sft", max_length=128, num_clients=20, clients_per_round=5,
                     rounds=args.rounds, rank=8)
    shape = build_shape(base)
    for name in sorted(STRATEGIES):
        cfg = replace(base, strategy=name)
        once, counted = timed(cfg, shape)
        seen, aggregate = traffic.Replay._seen, traffic.Replay._aggregate
        traffic.Replay._seen, traffic.Replay._aggregate = every_round, with_folds
        try:
            each, recounted = timed(cfg, shape)
        finally:
            traffic.Replay._seen, traffic.Replay._aggregate = seen, aggregate
        same = "same bytes" if counted == recounted else "BYTES DIFFER"
        print(f"{name:11s} {args.rounds} rounds  once per shape {1e3 * once / args.rounds:6.2f} ms/round"
              f"  every round {1e3 * each / args.rounds:6.2f} ms/round  ratio {each / once:6.1f}×  {same}")


if __name__ == "__main__":
    main()
