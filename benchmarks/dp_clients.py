"""The multi-client Poisson case of ``benchmarks/dp.py``: one batched round step of K clients.

K clients hold ``2·B·(k+1)`` examples (k = 0..K-1) of BBC News or of SST-2's training phrases
(``--data``), so their Poisson rates ``q_k = B / n_k`` differ and so do their batch sizes
(expected ``B`` each). Five steps of the same job are timed, each on one batched model of K
slots:

* **non-private**: ``fedlora.training.train.train_clients``, ``B`` examples per client, dynamic padding
  with rows grouped by length;
* **DP packed**: ``fedlora.privacy.dpsgd.dp_train_clients``: every client's Poisson batch back to
  back, ``Σ_k |batch_k|`` rows, grouped by length as the non-private step's;
* **DP one pass**: the packed rows in one pass, every row padded to the step's longest (the
  DP step before it grouped rows; :func:`one_pass`). With rows of one length (BBC News cut
  at ``--max-length``) it is the packed step; with SST-2's short phrases it is not;
* **DP padded**: one pass in the earlier layout, every client's segment padded to the
  longest draw ``L`` with zero-weight rows (``K·L`` rows; :func:`padded_passes` stands in for
  ``fedlora.privacy.dpsgd.dp_passes`` while it runs). Padding rows have zero gradient, so the result
  is the packed step's; only the work differs;
* **DP before**: the padded layout with a full backward (the parameters' summed gradients
  computed too, then discarded), as ``fedlora.privacy.dpsgd`` did before packing.

DP draws are keyed to the seed (``dp_reproducible``) so that the i-th packed and the i-th
padded step see the same batches.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
from dataclasses import dataclass, field

import torch


def padded_passes(fm, data, packed, cfg, device, full_backward=False):
    """``fedlora.privacy.dpsgd.dp_passes`` with the padded layout: one pass of K segments of L rows,
    zero-weight padding; ``full_backward``: through the parameters too (the layout's original
    cost)."""
    from fedlora.kernels import Routing
    from fedlora.privacy import dpsgd
    from fedlora.tasks import gather_rows

    m, L = len(packed.counts), max(1, int(packed.counts.max()))
    off = packed.offsets.tolist()
    idx, w = [], []
    for k in range(m):
        rows = packed.indices[off[k]:off[k + 1]]
        idx += rows + [packed.indices[0] if packed.indices else 0] * (L - len(rows))
        w += [1.0] * len(rows) + [0.0] * (L - len(rows))
    batch = gather_rows(data, idx, device, cfg.pad_to_longest)
    labels = batch.pop("labels")
    w = torch.tensor(w, device=device)                                     # (K·L,)
    slots = torch.arange(m, device=device)
    positions = cfg.task.logit_positions(labels)
    with dpsgd.Capture(fm.client_layers(), keep_outputs=not full_backward) as cap:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = fm(routing=Routing.segments(slots, L), positions=positions, **batch)
        losses = cfg.task.row_losses(out.logits, labels, positions) * w
        if full_backward:
            losses.sum().backward()
        else:
            cap.backward(losses.sum())
    yield dpsgd.DPPass(cap, slots.repeat_interleave(L), losses.detach(), m)


@contextlib.contextmanager
def patched(name: str, value):
    """Run ``fedlora.privacy.dpsgd`` with its ``name`` replaced by ``value``."""
    from fedlora.privacy import dpsgd

    before = getattr(dpsgd, name)
    setattr(dpsgd, name, value)
    try:
        yield
    finally:
        setattr(dpsgd, name, before)


def padded_layout(full_backward: bool = False):
    """Run ``fedlora.privacy.dpsgd`` with :func:`padded_passes` instead of its packed ``dp_passes``."""
    return patched("dp_passes", functools.partial(padded_passes, full_backward=full_backward))


def one_pass():
    """Run ``fedlora.privacy.dpsgd`` with its packed rows in one pass (no length groups: every row padded
    to the step's longest), as before the DP step grouped rows by length."""
    return patched("row_groups", lambda data, rows, pad_to_longest: None)


def _texts(args, n: int) -> tuple[list[str], list[int]]:
    """``n`` texts and labels, cycling through BBC News or SST-2's training phrases (``--data``)."""
    if args.data == "sst2":
        import csv
        from pathlib import Path

        path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2" / "train.tsv"
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        texts, labels = [r["sentence"] for r in rows], [int(r["label"]) for r in rows]
    else:
        from fedlora.data.loading import load_bbcnews

        ds = load_bbcnews()
        texts, labels = ds.texts, ds.labels
    return [texts[i % len(texts)] for i in range(n)], [labels[i % len(labels)] for i in range(n)]


def client_data(args, path: str) -> tuple[dict[str, torch.Tensor], list[range]]:
    """Rows for ``args.clients`` clients of ``2·B·(k+1)`` examples; the clients' row ranges."""
    from transformers import AutoTokenizer

    sizes = [2 * args.batch_size * (k + 1) for k in range(args.clients)]
    texts, labels = _texts(args, sum(sizes))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
    bounds = [0, *itertools.accumulate(sizes)]
    data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(labels)}
    return data, [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass
class ClientJob:
    """The K-client job: its step functions and the DP rounds they drew."""

    steps: dict = field(default_factory=dict)
    parts: list[range] = field(default_factory=list)
    dp_rounds: list[int] = field(default_factory=list)

    def rows(self, batch_size: int) -> tuple[float, float]:
        """Mean rows per DP step over the rounds drawn: ``(packed Σ_k n_k, padded K·L)``."""
        from fedlora.privacy.dpsgd import poisson_batches
        from fedlora.training.train import ClientSampler

        packed, padded = [], []
        for rnd in self.dp_rounds:
            samplers = [ClientSampler(p, k) for k, p in enumerate(self.parts)]
            for s in samplers:
                s.start_round(rnd)
            counts = poisson_batches(samplers, [min(1.0, batch_size / len(p)) for p in self.parts],
                                     reproducible=True).counts
            packed.append(float(counts.sum()))
            padded.append(float(len(self.parts) * max(1, int(counts.max()))))
        return sum(packed) / max(len(packed), 1), sum(padded) / max(len(padded), 1)


def client_job(args, base, path: str, device: torch.device) -> ClientJob:
    """The steps of :class:`ClientJob` on one K-slot MiniLM (LoRA ``args.rank``)."""
    from fedlora.models.model import AdapterConfig, FederatedModel
    from fedlora.privacy.accounting import Budget
    from fedlora.privacy.dpsgd import dp_train_clients
    from fedlora.training.train import ClientSampler, TrainConfig, train_clients

    data, parts = client_data(args, path)
    fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[args.rank] * args.clients,
                                                           alpha=16.0)).to(device)
    fm.reset_adapters(0)
    samplers = [ClientSampler(p, k) for k, p in enumerate(parts)]
    common = {"local_steps": 1, "batch_size": args.batch_size, "lr": 2e-3, "pad_to_longest": True}
    plain = TrainConfig(**common)
    private = TrainConfig(**common, max_grad_norm=1.0, dp_sample=True, dp_reproducible=True)
    budgets = [Budget(sigma=1.0, sample_rate=min(1.0, args.batch_size / len(p)), delta=1e-5,
                      epsilon=float("inf")) for p in parts]
    job = ClientJob(parts=parts)
    rounds = {name: itertools.count(1) for name in ("plain", "packed", "one pass", "padded", "before")}

    def packed_step():
        rnd = next(rounds["packed"])
        job.dp_rounds.append(rnd)
        dp_train_clients(fm, data, samplers, private, budgets, rnd)

    def other_step(name: str):
        layout = one_pass() if name == "one pass" else padded_layout(full_backward=name == "before")
        with layout:
            dp_train_clients(fm, data, samplers, private, budgets, next(rounds[name]))

    job.steps = {"non-private": lambda: train_clients(fm, data, samplers, plain, rnd=next(rounds["plain"])),
                 "DP packed": packed_step, **{f"DP {name}": functools.partial(other_step, name)
                                              for name in ("one pass", "padded", "before")}}
    return job
