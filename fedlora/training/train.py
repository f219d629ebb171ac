"""The one local training loop: K client slots per pass, K = 1 for a lone client.

Each step takes ``batch_size`` examples from every client in the pass, stacked as
contiguous equal segments, runs one forward/backward over the shared frozen base,
and steps one AdamW over the stacked ``(K, …)`` parameters. The loss is the sum of
the clients' mean losses, so each client's parameters get exactly the gradient of
its own mean loss; AdamW is elementwise, so a stacked AdamW is exactly K
independent ones. Gradient clipping, being norm based, is done per client.

With dynamic padding, rows of very different lengths (short phrases beside long ones) run
as a few micro-batches of similar lengths whose gradients add up to the same step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from fedlora.job.defaults import DP_RECIPE
from fedlora.job.schema import JobConfig
from fedlora.kernels import Routing, subrow_keys
from fedlora.models.model import FederatedModel
from fedlora.privacy.dpsgd import dp_train_clients, dropout_keys
from fedlora.privacy.opacus_dp import opacus_train_client
from fedlora.tasks import Task, gather_rows, get_task, row_groups
from fedlora.training.optim import make_optimizer, round_lr


@dataclass
class TrainConfig:
    """Local training settings shared by every client."""

    task: Task = field(default_factory=lambda: get_task("classification"))
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9): fedlora.training.optim
    max_grad_norm: float | None = None
    precision: str = "fp32"  # or "bf16": autocast the forward (parameters stay fp32)
    dp_sample: bool = False  # DP-SGD: Poisson batches, per-example clipping to max_grad_norm, noise
    dp_reproducible: bool = False  # DP draws keyed to the seed (tests only: no privacy then)
    dp_backend: str = "fedlora"  # DP-SGD by fedlora's batched kernels, or "opacus" (one client)
    pad_to_longest: bool = True  # dynamic padding: a pass is as wide as its longest row
    lr_schedule: str = "constant"  # or "cosine" over the rounds: fedlora.training.optim.round_lr
    lr_min: float = 0.0
    rounds: int = 1

    def for_round(self, rnd: int) -> TrainConfig:
        """These settings with round ``rnd``'s learning rate (:func:`~fedlora.training.optim.round_lr`)."""
        return replace(self, lr=round_lr(self.lr, rnd, self.rounds, self.lr_schedule, self.lr_min))

    @classmethod
    def from_job(cls, cfg: JobConfig, lone: bool = False, clip: float | None = None) -> TrainConfig:
        """The local-training settings of a job.

        ``lone``: for a client that trains alone (a deployed one), whose ``--dp-backend auto``
        is Opacus; the batched simulator's is fedlora's kernels. ``clip``: the per-example clip
        the server measured on the public file (``Coordinator.clip``), when the job has none.
        """
        clip = cfg.max_grad_norm or clip
        if cfg.dp == "sample" and clip is None:  # DP-SGD always clips per example
            clip = DP_RECIPE["max_grad_norm"]
        return cls(task=get_task(cfg.task), local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                   lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer, max_grad_norm=clip,
                   precision=cfg.precision,
                   dp_sample=cfg.dp == "sample", dp_reproducible=cfg.dp_reproducible,
                   dp_backend=cfg.dp_backend_for(lone), pad_to_longest=cfg.padding == "longest",
                   lr_schedule=cfg.lr_schedule, lr_min=cfg.lr_min, rounds=cfg.rounds)


class ClientSampler:
    """A client's example order, keyed by round: batches depend on ``(seed, round)`` only.

    :meth:`start_round` reseeds the generator from ``(seed, round)`` and starts a new
    permutation, so a client draws the same batches in round t whether it trains
    alone or batched with others, in one process or another, in an uninterrupted run
    or after a resume. Within a round, ``take`` walks permutations epoch by epoch.
    """

    @classmethod
    def for_client(cls, cfg: JobConfig, client: int, indices: Sequence[int]) -> ClientSampler:
        """Client ``client``'s sampler: the same in the simulator and deployment."""
        return cls(indices, seed=cfg.seed * 100_003 + client)

    def __init__(self, indices: Sequence[int], seed: int) -> None:
        if len(indices) == 0:
            raise ValueError("a client needs at least one training example")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seed = int(seed)
        self.start_round(0)

    def __len__(self) -> int:
        return len(self.indices)

    def start_round(self, rnd: int) -> None:
        """Restart the example order for round ``rnd`` (0 is Fed-SB's initialisation)."""
        self.round = int(rnd)
        self.rng = np.random.default_rng([self.seed, int(rnd)])
        self.order: list[int] = []

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = self.indices[self.rng.permutation(len(self.indices))].tolist()
            out.append(self.order.pop(0))
        return out


def _step(fm: FederatedModel, data: dict[str, Tensor], samplers: Sequence[ClientSampler],
          slots: Tensor, cfg: TrainConfig, device: torch.device, split: bool = True, step: int | None = 0
          ) -> Tensor:
    """One step's forward and backward passes for the clients of a pass: slot ``slots[k]`` takes
    sampler k's next ``batch_size`` examples, and the gradient of ``Σ_k L_k`` (``L_k``: client
    k's mean loss over its batch's loss terms) is accumulated into the parameters.

    With dynamic padding and ``split``, the rows run as micro-batches of similar lengths
    (:func:`~fedlora.tasks.row_groups`, rows routed to their slots by id): the same gradient over fewer
    padded tokens. Each row's dropout key (``--lora-dropout``) is its client's seed and round, ``step``
    and its place in the client's batch, so it travels with the row; ``step`` None: no dropout (the
    frozen weights' gradients of Fed-SB's initialisation read ``x`` itself). Returns the ``(S,)`` losses
    ``L_k``.
    """
    n, task = cfg.batch_size, cfg.task
    idx = [i for s in samplers for i in s.take(n)]
    owner = torch.arange(len(samplers)).repeat_interleave(n)              # (N,) client of each row
    keys = (None if step is None else
            dropout_keys(samplers, owner, torch.arange(n).repeat(len(samplers)), step))  # (N,)
    rows = torch.as_tensor(idx, dtype=torch.long)
    counts = torch.zeros(len(samplers)).index_add_(0, owner, task.loss_counts(data["labels"][rows]).float())
    groups = row_groups(data, rows, cfg.pad_to_longest) if split else None
    total = torch.zeros(len(samplers), dtype=torch.float64)
    for group in groups or [None]:
        who = owner if group is None else owner[group]
        batch = gather_rows(data, idx if group is None else rows[group].tolist(), device, cfg.pad_to_longest)
        inputs, labels = task.model_inputs(batch)
        r = task.rows_per_example  # an example's model rows are adjacent: its client's segment holds them
        routing = (Routing.segments(slots, n * r) if group is None
                   else Routing.from_ids(slots[who.to(device)].repeat_interleave(r)))
        positions = task.logit_positions(labels)
        drop = None if keys is None else subrow_keys(keys if group is None else keys[group], r)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = fm(routing=routing, positions=positions, dropout_keys=drop, **inputs)
        share = task.loss_sums(out.logits, labels, positions) / counts[who].clamp_min(1.0).to(device)
        share.sum().backward()
        total.index_add_(0, who, share.detach().double().cpu())
    return total


def clip_per_client(params: Sequence[Tensor], max_norm: float) -> Tensor:
    """Scale each client's gradient (slice k of every stacked parameter) to norm ≤ max_norm.

    Returns the ``(K,)`` norms before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads]).sum(dim=0)
    norms = sq.sqrt()
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms


def train_clients(fm: FederatedModel, data: dict[str, Tensor], samplers: Sequence[ClientSampler],
                  cfg: TrainConfig, slots: Sequence[int] | None = None,
                  progress=None, rnd: int | None = None) -> list[float]:
    """Train the clients in ``slots`` (default: all) for ``cfg.local_steps`` steps.

    ``rnd``: restart every sampler's order for that round first. Returns each
    client's mean training loss over the steps.
    """
    if rnd is not None:
        for s in samplers:
            s.start_round(rnd)
    slots = list(range(len(samplers))) if slots is None else list(slots)
    if len(slots) != len(samplers):
        raise ValueError(f"{len(samplers)} samplers for {len(slots)} slots")
    if slots != list(range(len(slots))) or len(slots) > fm.num_clients:
        raise ValueError("a pass trains slots 0..m-1 (m ≤ the model's slots), one per sampler")
    device = next(fm.parameters()).device
    slot_t = torch.as_tensor(slots, dtype=torch.long, device=device)
    params = fm.trainable_parameters()
    opt = make_optimizer(params, cfg)
    fm.train()
    total = torch.zeros(len(slots), dtype=torch.float64)
    for step in range(cfg.local_steps):
        opt.zero_grad(set_to_none=True)
        total += _step(fm, data, samplers, slot_t, cfg, device, step=step)
        if cfg.max_grad_norm is not None:
            clip_per_client(params, cfg.max_grad_norm)
        opt.step()
        if progress is not None:
            progress()
    opt.zero_grad(set_to_none=True)
    fm.eval()
    return (total / max(cfg.local_steps, 1)).tolist()


def local_training(fm: FederatedModel, data: dict[str, Tensor], samplers: Sequence[ClientSampler],
                   cfg: TrainConfig, rnd: int, budgets=None, progress=None) -> list[float]:
    """Round ``rnd`` of slots ``0..m-1``: :func:`train_clients`, or DP-SGD with each client's
    :class:`~fedlora.privacy.Budget` when ``cfg.dp_sample``: batched (``fedlora.privacy.dpsgd``) or,
    with ``dp_backend="opacus"``, one client through Opacus (``fedlora.privacy.opacus_dp``); at the
    round's learning rate (``--lr-schedule``)."""
    cfg = cfg.for_round(rnd)
    if cfg.dp_sample and cfg.dp_backend == "opacus":
        if len(samplers) != 1:
            raise ValueError(f"the Opacus DP path trains one client per pass, got {len(samplers)}")
        return [opacus_train_client(fm, data, samplers[0], cfg, budgets[0], rnd, progress)]
    if cfg.dp_sample:
        return dp_train_clients(fm, data, samplers, cfg, budgets, rnd, progress)
    return train_clients(fm, data, samplers, cfg, rnd=rnd, progress=progress)
