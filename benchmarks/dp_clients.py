"""The multi-client Poisson case of ``benchmarks/dp.py``: one batched round step of K clients.

K clients hold ``2·B·(k+1)`` examples (k = 0..K-1), so their Poisson rates ``q_k = B / n_k``
differ and so do their batch sizes (expected ``B`` each). Four steps of the same job are
timed, each on one batched model of K slots:

* **non-private**: ``fedlora.train.train_clients``, ``B`` examples per client, dynamic padding;
* **DP packed**: ``fedlora.dpsgd.dp_train_clients``: every client's Poisson batch back to
  back, ``Σ_k |batch_k|`` rows;
* **DP padded**: the same step with the earlier layout, every client's segment padded to
  the longest draw ``L`` with zero-weight rows (``K·L`` rows; :func:`padded_forward` stands
  in for ``fedlora.dpsgd._forward`` while it runs). Padding rows have zero gradient, so
  the result is the packed step's; only the work differs;
* **DP before**: the padded layout with a full backward (the parameters' summed gradients
  computed too, then discarded), as ``fedlora.dpsgd`` did before packing.

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


def padded_forward(fm, data, samplers, cfg, rates, device, full_backward=False):
    """``fedlora.dpsgd._forward`` with the padded layout: K segments of L rows, zero-weight padding;
    ``full_backward``: through the parameters too (the layout's original cost)."""
    from fedlora import dpsgd
    from fedlora.kernels import Routing
    from fedlora.tasks import gather_rows

    packed = dpsgd.poisson_batches(samplers, rates, cfg.dp_reproducible)
    m, L = len(samplers), max(1, int(packed.counts.max()))
    off = packed.offsets.tolist()
    idx, w = [], []
    for k, s in enumerate(samplers):
        rows = packed.indices[off[k]:off[k + 1]]
        idx += rows + [int(s.indices[0])] * (L - len(rows))
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
    return dpsgd.DPPass(cap, slots.repeat_interleave(L), packed.counts, losses.detach(), m)


@contextlib.contextmanager
def padded_layout(full_backward: bool = False):
    """Run ``fedlora.dpsgd`` with :func:`padded_forward` instead of its packed ``_forward``."""
    from fedlora import dpsgd

    packed = dpsgd._forward
    dpsgd._forward = functools.partial(padded_forward, full_backward=full_backward)
    try:
        yield
    finally:
        dpsgd._forward = packed


def client_data(args, path: str) -> tuple[dict[str, torch.Tensor], list[range]]:
    """BBC News rows for ``args.clients`` clients of ``2·B·(k+1)`` examples; the clients' row ranges."""
    from transformers import AutoTokenizer

    from fedlora.data import load_bbcnews

    sizes = [2 * args.batch_size * (k + 1) for k in range(args.clients)]
    ds = load_bbcnews()
    texts = [ds.texts[i % len(ds.texts)] for i in range(sum(sizes))]
    labels = [ds.labels[i % len(ds.labels)] for i in range(sum(sizes))]
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
        from fedlora.dpsgd import poisson_batches
        from fedlora.train import ClientSampler

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
    from fedlora.dpsgd import dp_train_clients
    from fedlora.model import AdapterConfig, FederatedModel
    from fedlora.privacy import Budget
    from fedlora.train import ClientSampler, TrainConfig, train_clients

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
    rounds = {name: itertools.count(1) for name in ("plain", "packed", "padded", "before")}

    def packed_step():
        rnd = next(rounds["packed"])
        job.dp_rounds.append(rnd)
        dp_train_clients(fm, data, samplers, private, budgets, rnd)

    def padded_step(name: str):
        with padded_layout(full_backward=name == "before"):
            dp_train_clients(fm, data, samplers, private, budgets, next(rounds[name]))

    job.steps = {"non-private": lambda: train_clients(fm, data, samplers, plain, rnd=next(rounds["plain"])),
                 "DP packed": packed_step, "DP padded": lambda: padded_step("padded"),
                 "DP before": lambda: padded_step("before")}
    return job
