"""What the server does with the public ``--init-data`` file before round 1, at no privacy cost.

No private example is read here. Each step runs on slot 0 of the server's model ``fm`` (the
simulator's batched model, or the ServerApp's one-slot model), from the global state loaded in it:

* :func:`train_head` (``--head public``): the task head alone, as a linear probe, then frozen;
* :func:`warm_start` (``--public-steps N``): the adapter plan's trained factors, N ordinary
  (non-private) local steps on the public examples. The result enters the global state through the
  strategy's own aggregate of that one upload, so round 0's state is what a round of one client
  holding the public file would have made (FedAvg: its factors; FFA-LoRA: its B; Fed-SB: its R);
* :func:`measure_clip` (``--dp sample`` without ``--max-grad-norm``): the ``--clip-quantile`` of the
  per-example gradient norms at the start state, the clip every client's DP-SGD uses (with a warm
  start, on a share of the public examples held out of it: :func:`split_public`);
* :func:`public_uploads`: one of Fed-SB's initialisation phases, on the public file.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from fedlora.job.schema import JobConfig
from fedlora.models.model import FederatedModel
from fedlora.models.state import extract_upload, head_of
from fedlora.privacy.dpsgd import example_norms
from fedlora.strategies import ClientUpload, GlobalState, Strategy
from fedlora.strategies.base import Probe
from fedlora.strategies.plan import AdapterPlan
from fedlora.strategies.wrap import Wrapped
from fedlora.training.sketch import client_sketches
from fedlora.training.train import ClientSampler, TrainConfig, train_clients

#: ``--head public``: the head alone, on the public examples, as a linear probe: AdamW (whatever
#: ``--optimizer`` the clients use) at HEAD_LR, batches of HEAD_BATCH, HEAD_EPOCHS passes.
#: Measured on SST-2 (1,000 public phrases, MiniLM): 3 passes of 256 at 3e-3 left it at the
#: majority class (51.1%); 10 of 64 at 1e-2 gave 66.2%, at 3e-2 64.9%, at 0.1 67.5%.
HEAD_EPOCHS, HEAD_LR, HEAD_BATCH = 10, 1e-2, 64
#: The measured clip (``--clip-quantile``) reads at most this many public examples.
CLIP_ROWS = 1024
#: With a warm start, this share of the public examples (drawn with the seed) is held out of it and
#: the clip is measured on them alone: the examples it fit have smaller gradients than unseen ones.
#: On SST-2 (MiniLM, 40 steps of 256 at 3e-3) the median norm fell from 1.42 at the cold start to
#: 0.0034 on the 1,000 phrases it trained on, and to 0.0118 on 200 phrases held out of 1,000.
CLIP_HOLDOUT = 0.2
#: Seeds of the public file's example orders, apart from every client's (``seed * 100_003 + k``).
HEAD_SEED, PHASE_SEED, WARM_SEED, HOLDOUT_SEED = 100_001, 100_002, 100_004, 100_005


def split_public(n: int, cfg: JobConfig) -> tuple[list[int], list[int]]:
    """``(warm-start rows, clip rows)`` of ``n`` public examples: all of them for both without a
    warm start (or a single example); with one, a seeded :data:`CLIP_HOLDOUT` share (at least
    1) is the clip's alone."""
    if not cfg.public_steps or n < 2:
        return list(range(n)), list(range(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + HOLDOUT_SEED))
    held = min(n - 1, max(1, round(CLIP_HOLDOUT * n)))
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def _sampler(rows, cfg: JobConfig, offset: int) -> ClientSampler:
    return ClientSampler(rows, seed=cfg.seed * 100_003 + offset)


def train_head(fm: FederatedModel, public: dict[str, Tensor], cfg: JobConfig,
               plan: AdapterPlan) -> dict[str, Tensor]:
    """``--head public``: the head trained alone on the public examples (slot 0, the adapters as
    loaded; :data:`HEAD_EPOCHS` epochs at :data:`HEAD_LR`, no clipping: it is not private), then
    frozen again; returns slot 0's head."""
    n = len(public["labels"])
    batch = min(HEAD_BATCH, n)
    tc = replace(TrainConfig.from_job(cfg), dp_sample=False, max_grad_norm=None, optimizer="adamw",
                 lr=HEAD_LR, batch_size=batch, local_steps=-(-HEAD_EPOCHS * n // batch))
    for layer in fm.adapters.values():
        layer.set_trainable(())
    fm.freeze_heads(False)
    try:
        train_clients(fm, public, [_sampler(range(n), cfg, HEAD_SEED)], tc, rnd=0)
    finally:
        fm.freeze_heads(True)
        fm.set_plan(plan)
    return head_of(fm, 0)


def innermost(strategy: Strategy) -> Strategy:
    """The strategy inside every wrapper (client-level DP, robust aggregation): a public
    update is neither noised nor screened."""
    while isinstance(strategy, Wrapped):
        strategy = strategy.inner
    return strategy


def warm_start(fm: FederatedModel, public: dict[str, Tensor], cfg: JobConfig, strategy: Strategy,
               state: GlobalState) -> GlobalState:
    """``--public-steps``: ``cfg.public_steps`` non-private local steps of slot 0 on the public
    examples (the job's optimizer, lr and batch, capped at the file's size; the plan loaded in
    ``fm``), then the strategy's aggregate of that one upload over ``state``.

    Raises
    ------
    ValueError
        The strategy folds its aggregate into the base (FLoRA, FedEx-LoRA): round 0 has no fold.
    """
    if strategy.folds:  # checked before training: round 0 has no fold to send
        raise ValueError(f"--public-steps: {strategy.name} folds its aggregate into the base weights,"
                         " which round 0 cannot")
    rows, _ = split_public(len(public["labels"]), cfg)
    tc = replace(TrainConfig.from_job(cfg), dp_sample=False, max_grad_norm=None,
                 local_steps=cfg.public_steps, batch_size=min(cfg.batch_size, len(rows)))
    train_clients(fm, public, [_sampler(rows, cfg, WARM_SEED)], tc, rnd=0)
    return innermost(strategy).aggregate([extract_upload(fm, 0, len(rows))], state).state


def measure_clip(fm: FederatedModel, public: dict[str, Tensor], cfg: JobConfig) -> float:
    """The ``--clip-quantile`` of the per-example gradient norms of the trainable tensors on (up to
    :data:`CLIP_ROWS` of) the public examples the warm start did not train on
    (:func:`split_public`), at the state loaded in slot 0, without dropout (which would draw from
    the generator the clients' training draws from)."""
    rows = split_public(len(public["labels"]), cfg)[1][:CLIP_ROWS]
    fm.eval()
    norms = example_norms(fm, public, rows, TrainConfig.from_job(cfg, clip=1.0),
                          next(fm.parameters()).device)
    return float(torch.quantile(norms.double(), cfg.clip_quantile))


def public_uploads(fm: FederatedModel, public: dict[str, Tensor], cfg: JobConfig,
                   probes: dict[str, Probe]) -> list[ClientUpload]:
    """One initialisation phase over the public examples, on slot 0: a single upload."""
    tc = replace(TrainConfig.from_job(cfg), dp_sample=False)
    sampler = _sampler(range(len(public["labels"])), cfg, PHASE_SEED)
    got = client_sketches(fm, public, [sampler], tc, cfg.init_batches, probes)
    return [ClientUpload(num_examples=len(sampler), grads={k: g[0] for k, g in got.items()})]
