"""Sample-level DP-SGD for the K clients of a pass, in one batched forward/backward.

One step, for every client k of the pass (each with its own sampling rate
``q_k = batch_size / n_k``, noise multiplier ``σ_k`` and :class:`~fedlora.privacy.Budget`):

1. **Poisson sampling**: each of the client's examples joins the batch with
   probability ``q_k``. Draws and noise come from OS entropy; ``--dp-reproducible``
   keys them to (client seed, round, step) instead, so the simulator, a deployment
   and a resumed run agree, for tests only (knowing the seed removes the privacy).
   Batches differ in size, so they are packed back to back (client 0's rows, then
   client 1's, …) with each row's slot id: the pass runs ``Σ_k |batch_k|`` rows and no
   padding; a client that drew no example has no rows.
2. One forward/backward of ``Σ_i ℓ_i`` over all rows, each routed to its slot
   (``Routing.from_ids``); with dynamic padding, one per group of rows of similar length
   (:func:`dp_passes`, the non-private step's grouping), since short phrases padded to the
   longest row of a Poisson batch would cost the step up to twice its work. Hooks keep
   each adapted layer's input ``x`` and output gradient ``g``; since examples do not
   interact, ``g_i`` is the gradient of example i's own loss. The backward stops at those
   outputs (:meth:`Capture.backward`): the parameters' summed gradients are not needed.
   When no client drew an example there is no pass: every clipped sum is zero and the
   step releases noise only. With ``--lora-dropout``, a row's key is a secret number of its client's
   step (``--dp-reproducible``: the client's seed and round) and the example's place among the
   client's examples: a fresh mask, not one that others' presence (which shifts the place) or the
   public seed decides; the hooks keep the dropped-out input its per-example gradients read.
3. Per-example gradients of every trainable tensor (``kernels.per_sample``), their
   joint norm, clipping to ``C`` (``--max-grad-norm``): ``c_i = min(1, C / ‖∇ℓ_i‖)``.
4. Client k's gradient is ``(Σ_{i∈k} c_i ∇ℓ_i + σ_k C ξ_k) / (q_k n_k)`` (the sum over its
   rows by id, :func:`per_client_sum`), ``ξ_k`` standard
   normal from the client's own generator, then one stacked AdamW
   step (elementwise, so K independent ones). A client whose budget cannot afford the
   step sits it out (its slot is restored after the step).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from fedlora.kernels import Routing, row_keys, subrow_keys
from fedlora.kernels.per_sample import (
    dense_grad_sample,
    lora_grad_sample,
    sb_grad_sample,
)
from fedlora.models.head import BatchedLinear
from fedlora.models.lora import BatchedLoRALinear
from fedlora.privacy.accounting import Budget, GaussianNoise
from fedlora.tasks import gather_rows, row_groups
from fedlora.training.optim import make_optimizer


class Capture:
    """Forward hooks that keep each adapter/head layer's input ``x`` and output gradient ``g``.

    A layer called more than once in a pass (ALBERT shares one block's layers across its depth)
    has its calls joined along the token axis, in call order: a linear layer's per-example
    gradient is a sum over its ``(g_t, x_t)`` pairs, and the calls' pairs are more of them.
    With ``keep_outputs`` the layers' outputs are kept too, for :meth:`backward`. Not for a model that
    checkpoints activations in training mode, whose recomputation would call each layer once more
    without another gradient (DP-SGD refuses ``--gradient-checkpointing``; Fed-SB's sketches run in
    eval mode, where transformers does not checkpoint).
    """

    def __init__(self, modules: Sequence[nn.Module], keep_outputs: bool = False) -> None:
        self.modules = list(modules)
        self.keep_outputs = keep_outputs
        self.calls: dict[nn.Module, list[Tensor]] = {}         # module -> its calls' inputs
        self.grads: dict[nn.Module, dict[int, Tensor]] = {}    # module -> call -> output gradient
        self.outputs: list[tuple[nn.Module, int, Tensor]] = []
        self.joined: tuple[dict, dict] | None = None
        self.handles = []

    def __enter__(self) -> Capture:
        for m in self.modules:
            self.handles.append(m.register_forward_hook(self._hook))
        return self

    def _hook(self, module, inputs, output) -> None:
        x = module.router.as_rows(inputs[0].detach())  # a flattened (N·T, d) input kept as (N, T, d)
        if isinstance(module, BatchedLoRALinear):
            x = module.dropped(x)                      # what the adapter reads (--lora-dropout)
        n, calls = x.shape[0], self.calls.setdefault(module, [])
        call = len(calls)
        calls.append(x)
        self.joined = None
        if output.requires_grad:
            grads = self.grads.setdefault(module, {})
            output.register_hook(lambda grad: grads.__setitem__(call, _rows(grad.detach(), n)))
            if self.keep_outputs:
                self.outputs.append((module, call, output))

    @property
    def x(self) -> dict[nn.Module, Tensor]:
        """Module -> its input, ``(N, d)`` or ``(N, T, d)``; several calls' as ``(N, ΣT, d)``."""
        return self._join()[0]

    @property
    def g(self) -> dict[nn.Module, Tensor]:
        """Module -> its output gradient, shaped as :attr:`x` is (modules that got one)."""
        return self._join()[1]

    def _join(self) -> tuple[dict, dict]:
        if self.joined is None:
            x, g = {}, {}
            for m, calls in self.calls.items():
                grads = self.grads.get(m, {})
                if len(calls) == 1:
                    x[m] = calls[0]
                    if grads:
                        g[m] = grads[0]
                    continue
                x[m] = torch.cat([_tokens(t) for t in calls], dim=1)
                if len(grads) == len(calls):
                    g[m] = torch.cat([_tokens(grads[i]) for i in range(len(calls))], dim=1)
            self.joined = (x, g)
        return self.joined

    def backward(self, loss: Tensor) -> None:
        """Backpropagate ``loss`` only as far as the kept outputs (``keep_outputs``): their
        gradients ``g`` are all that per-example gradients need, so the parameters' own summed
        gradients (on the gather path, a scatter of every ``A[ids]``) are never computed."""
        grads = torch.autograd.grad(loss, [y for _, _, y in self.outputs], allow_unused=True)
        for (m, call, _), grad in zip(self.outputs, grads, strict=True):
            if grad is not None:
                self.grads[m][call] = _rows(grad.detach(), self.calls[m][call].shape[0])
        self.outputs.clear()
        self.joined = None

    def group_rows(self, r: int) -> None:
        """Take every ``r`` adjacent rows as one example's: ``(r·N, T, ·) -> (N, r·T, ·)`` (a
        per-example gradient is a sum over the example's tokens, whichever row holds them)."""
        if r == 1:
            return
        for kept in self._join():
            for m, t in kept.items():
                kept[m] = t.reshape(t.shape[0] // r, r * t.shape[1], *t.shape[2:])

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _tokens(t: Tensor) -> Tensor:
    """``t`` with a token axis: ``(N, d)`` as ``(N, 1, d)``."""
    return t if t.dim() == 3 else t.unsqueeze(1)


def _rows(t: Tensor, n: int) -> Tensor:
    """``t`` as ``n`` batch rows: a flattened ``(N·T, d)`` output gradient as ``(N, T, d)``."""
    return t if t.shape[0] == n else t.reshape(n, -1, t.shape[-1])


def layer_grad_samples(layer: nn.Module, x: Tensor, g: Tensor,
                       ids: Tensor) -> list[tuple[nn.Parameter, Tensor]]:
    """One adapter or head layer's ``(parameter, (N, *parameter.shape[1:]))`` per-example
    gradients, from its input ``x``, output gradient ``g`` and the rows' slots ``ids``."""
    if isinstance(layer, BatchedLinear):
        if not layer.weight.requires_grad:  # --head frozen / public: no gradient, no clip share, no noise
            return []
        gW, gb = dense_grad_sample(x, g)
        return [(layer.weight, gW)] + ([] if layer.bias is None else [(layer.bias, gb)])
    if layer.core:
        return [(layer.lora_R, sb_grad_sample(x, g, layer.sb_A, layer.sb_B, layer.scale[0]))]
    A, B = layer.lora_A, layer.lora_B
    if layer.heterogeneous:
        A = A * layer.rank_mask.unsqueeze(-1)
        B = B * layer.rank_mask.unsqueeze(1)
    gA, gB = lora_grad_sample(x, g, A.detach()[ids], B.detach()[ids], layer.scale[ids],
                              want_A=layer.lora_A.requires_grad, want_B=layer.lora_B.requires_grad)
    return [(p, gs) for p, gs in ((layer.lora_A, gA), (layer.lora_B, gB)) if p.requires_grad]


def grad_samples(fm, cap: Capture, ids: Tensor) -> list[tuple[nn.Parameter, Tensor]]:
    """``(parameter, (N, *parameter.shape[1:]) per-example gradients)`` of every trainable tensor."""
    out = []
    for layer in fm.client_layers():
        out += layer_grad_samples(layer, cap.x[layer], cap.g[layer], ids)
    return out


def dp_parameters(fm) -> list[nn.Parameter]:
    """The trainable tensors in :func:`grad_samples`' order (the order noise is drawn in)."""
    return [p for layer in fm.client_layers() for p in layer.parameters() if p.requires_grad]


def joint_sq_norms(gs: Sequence[tuple[nn.Parameter, Tensor]]) -> Tensor:
    """``(N,)``: each row's squared gradient norm jointly over every tensor of :func:`grad_samples`."""
    return sum(g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for _, g in gs)


def clip_factors(sq_norms: Tensor, weights: Tensor | None, max_norm: float) -> Tensor:
    """``w_i · min(1, C / ‖∇ℓ_i‖)`` per row (``weights`` None: every ``w_i = 1``)."""
    c = (max_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)
    return c if weights is None else weights * c


def dropout_keys(samplers, owner: Tensor, examples: Tensor, step: int, secret: bool = False) -> Tensor:
    """``(N,)`` dropout keys (``fedlora.kernels.row_keys``) of rows of the clients ``owner`` (an index
    into ``samplers``): each sampler's seed (``secret``: a secret 63-bit number drawn for each) and
    round, ``step`` and the rows' ``examples``."""
    seeds = torch.tensor([secrets.randbits(63) if secret else s.seed for s in samplers], dtype=torch.long)
    rounds = torch.tensor([s.round for s in samplers], dtype=torch.long)
    return row_keys(seeds[owner], rounds[owner], step, examples.long())


class PackedBatch(NamedTuple):
    """Every client's Poisson batch, packed back to back: client 0's rows, then client 1's, …"""

    indices: list[int]  # (N,) dataset rows
    ids: Tensor         # (N,) long: the client (slot) of each row
    counts: Tensor      # (m,) long: each client's rows, 0 for a client that drew none
    keys: Tensor | None = None  # (N,) each row's dropout key (a training step's batch)

    @property
    def offsets(self) -> Tensor:
        """``(m + 1,)``: where each client's segment starts, then ``N``."""
        return torch.cat([self.counts.new_zeros(1), self.counts.cumsum(0)])


def poisson_batches(samplers, rates: Sequence[float], reproducible: bool = False,
                    step: int | None = None) -> PackedBatch:
    """Each client's Poisson batch (example j of client k joins with probability ``q_k``), packed;
    with ``step``, each row's dropout key (:func:`dropout_keys`, the example's place being j).

    The draws and the dropout keys are secret (OS entropy) unless ``reproducible`` (then the
    sampler's own generator and seed): privacy amplification by sampling assumes the adversary does
    not know which examples were drawn, and an example's mask must not hang on the others' presence.
    """
    picks, rows = [], []
    for s, q in zip(samplers, rates, strict=True):
        rng = s.rng if reproducible else np.random.default_rng(secrets.randbits(128))
        picks.append(np.flatnonzero(rng.random(len(s.indices)) < q))      # the examples' places j
        rows.append(s.indices[picks[-1]])
    counts = torch.tensor([len(p) for p in picks], dtype=torch.long)        # (m,)
    ids = torch.arange(len(picks)).repeat_interleave(counts)                # (N,)
    indices = np.concatenate(rows).tolist() if rows else []
    if step is None or not picks:
        return PackedBatch(indices, ids, counts)
    places = torch.from_numpy(np.concatenate(picks))                        # (N,)
    return PackedBatch(indices, ids, counts, dropout_keys(samplers, ids, places, step, not reproducible))


def per_client_sum(values: Tensor, ids: Tensor, m: int) -> Tensor:
    """``(N, ...) -> (m, ...)``: row i added into client ``ids[i]``'s sum (zero for a client
    without rows)."""
    # as (N, D) rows: the CPU index_add_ of 3-D rows goes through a slow scatter
    flat = values.reshape(values.shape[0], math.prod(values.shape[1:]))       # (N, D)
    out = flat.new_zeros(m, flat.shape[1]).index_add_(0, ids.to(values.device), flat)
    return out.view(m, *values.shape[1:])                                      # (m, ...)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


def noisy_mean(summed: Tensor, sigmas: Tensor, max_norm: float, expected: Tensor,
               gens: Sequence[GaussianNoise]) -> Tensor:
    """``(summed_k + σ_k C ξ_k) / E_k`` per client k (rows of ``summed``), on the CPU.

    ``ξ_k`` is drawn from client k's own generator, so a client's noise does not depend
    on which other clients share its pass.
    """
    summed = summed.detach().float().cpu()
    noise = torch.stack([g.normal(summed.shape[1:]).float() for g in gens])
    return (summed + _bcast(sigmas, summed) * max_norm * noise) / _bcast(expected, summed)


def noise_generator(seed: int, rnd: int, step: int, reproducible: bool = True) -> GaussianNoise:
    """A client's noise for one step: keyed by (client seed, round, step) if ``reproducible``
    (tests, parity checks: anyone who knows the seed can subtract it), else OS entropy."""
    return GaussianNoise(reproducible, seed, rnd, step, 0xD9)


@dataclass
class DPPass:
    """One forward/backward over some of the packed rows of clients (slots) ``0..m-1``.

    Attributes
    ----------
    cap : Capture
        Each client layer's input ``x`` and output gradient ``g``, ``(N, ...)``; empty when
        no client drew an example (``N = 0``: there was no forward).
    ids : Tensor
        ``(N,)`` long, on the model's device: the slot of each row.
    losses : Tensor
        ``(N,)`` each row's own loss, detached.
    m : int
        The number of clients.
    """

    cap: Capture
    ids: Tensor
    losses: Tensor
    m: int


def _rows_pass(fm, data, idx: list[int], ids: Tensor, m: int, cfg, device, keys: Tensor | None) -> DPPass:
    """Forward/backward of ``Σ_i ℓ_i`` over rows ``idx`` (routed to slots ``ids``, dropout ``keys``)
    with capture, down to the client layers' outputs only (the parameters' ``.grad`` are left alone)."""
    inputs, labels = cfg.task.model_inputs(gather_rows(data, idx, device, cfg.pad_to_longest))
    positions = cfg.task.logit_positions(labels)
    r = cfg.task.rows_per_example
    cap = Capture(fm.client_layers(), keep_outputs=True)
    with cap:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = fm(routing=Routing.from_ids(ids.repeat_interleave(r)), positions=positions,
                     dropout_keys=None if keys is None else subrow_keys(keys, r), **inputs)
        losses = cfg.task.row_losses(out.logits, labels, positions)            # (N,)
        cap.backward(losses.sum())
    cap.group_rows(r)
    return DPPass(cap, ids, losses.detach(), m)


def dp_passes(fm, data, packed: PackedBatch, cfg, device) -> Iterator[DPPass]:
    """The packed rows' passes: with dynamic padding, one per group of similar lengths
    (:func:`~fedlora.tasks.row_groups`, as the non-private step), else one. Every
    per-example quantity is per row, so the groups' sums are the one pass's; only the padded
    tokens differ. No row at all: one empty pass (no forward; the step releases noise only)."""
    m = len(packed.counts)
    if not packed.indices:
        yield DPPass(Capture([]), packed.ids.to(device), torch.zeros(0, device=device), m)
        return
    rows = torch.as_tensor(packed.indices, dtype=torch.long)                  # (N,)
    for group in row_groups(data, rows, cfg.pad_to_longest) or [None]:
        if group is None:
            idx, ids, keys = packed.indices, packed.ids, packed.keys
        else:
            idx, ids = rows[group].tolist(), packed.ids[group]
            keys = None if packed.keys is None else packed.keys[group]
        yield _rows_pass(fm, data, idx, ids.to(device), m, cfg, device, keys)


def pass_sums(fm, data, packed: PackedBatch, cfg, device,
              reduce: Callable[[DPPass], dict]) -> tuple[dict, Tensor]:
    """``reduce`` (key -> ``(m, ...)`` per-client sums of one pass) summed over
    :func:`dp_passes`, and each client's ``(m,)`` float64 loss sum, on the CPU."""
    total: dict = {}
    losses = torch.zeros(len(packed.counts), dtype=torch.float64)
    for dpp in dp_passes(fm, data, packed, cfg, device):
        for key, part in reduce(dpp).items():
            total[key] = total[key] + part if key in total else part
        losses += per_client_sum(dpp.losses.double(), dpp.ids, dpp.m).cpu()
    return total, losses


def clipped_sums(fm, dpp: DPPass, max_norm: float) -> dict[nn.Parameter, Tensor]:
    """Trainable tensor -> ``(m, *parameter.shape[1:])``, in :func:`dp_parameters`' order: each
    client's sum of its rows' per-example gradients, clipped to ``max_norm`` jointly over all
    tensors."""
    if dpp.ids.numel() == 0:
        return {p: torch.zeros(dpp.m, *p.shape[1:], device=p.device) for p in dp_parameters(fm)}
    gs = grad_samples(fm, dpp.cap, dpp.ids)
    c = clip_factors(joint_sq_norms(gs), None, max_norm)
    return {p: per_client_sum(_bcast(c, gr) * gr, dpp.ids, dpp.m) for p, gr in gs}


def example_norms(fm, data: dict[str, Tensor], rows: Sequence[int], cfg, device) -> Tensor:
    """``(N,)``: each row's gradient norm, jointly over the trainable tensors of slot 0 (what
    DP-SGD clips), ``cfg.batch_size`` rows a pass (a batch's memory, whatever ``N``), each grouped
    into passes as :func:`dp_passes` does (so not in ``rows``' order)."""
    if not rows:
        raise ValueError("example_norms needs at least one row")
    out, rows, size = [], list(rows), max(1, cfg.batch_size)
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        packed = PackedBatch(chunk, torch.zeros(len(chunk), dtype=torch.long), torch.tensor([len(chunk)]))
        for dpp in dp_passes(fm, data, packed, cfg, device):
            out.append(joint_sq_norms(grad_samples(fm, dpp.cap, dpp.ids)).sqrt().cpu())
    return torch.cat(out)


def dp_train_clients(fm, data: dict[str, Tensor], samplers, cfg, budgets: Sequence[Budget],
                     rnd: int, progress=None) -> list[float]:
    """DP-SGD for slots ``0..m-1`` (one per sampler); each client's mean batch loss."""
    m = len(samplers)
    for s in samplers:
        s.start_round(rnd)
    device = next(fm.parameters()).device
    params = fm.trainable_parameters()
    opt = make_optimizer(params, cfg)
    rates = [min(1.0, cfg.batch_size / len(s)) for s in samplers]
    expected = torch.tensor([q * len(s) for q, s in zip(rates, samplers, strict=True)])
    total, count = torch.zeros(m, dtype=torch.float64), torch.zeros(m)
    fm.train()
    for step in range(cfg.local_steps):
        active = torch.tensor([b.can_step() for b in budgets])
        if not active.any():
            break
        opt.zero_grad(set_to_none=True)
        packed = poisson_batches(samplers, rates, cfg.dp_reproducible, step)
        sums, losses = pass_sums(fm, data, packed, cfg, device,
                                 lambda dpp: clipped_sums(fm, dpp, cfg.max_grad_norm))
        gens = [noise_generator(s.seed, rnd, step, cfg.dp_reproducible) for s in samplers]
        sigmas = torch.tensor([b.sigma for b in budgets])
        for p, summed in sums.items():
            grad = noisy_mean(summed, sigmas, cfg.max_grad_norm, expected, gens) * _bcast(active, summed)
            p.grad = torch.zeros_like(p)
            p.grad[:m] = grad.to(p.device, p.dtype)
        keep = [p.detach()[:m].clone() for p in params]
        opt.step()
        with torch.no_grad():
            for p, old in zip(params, keep, strict=True):
                p[:m][~active.to(p.device)] = old[~active.to(p.device)]
        total += losses * active
        count += packed.counts * active
        for b, a in zip(budgets, active.tolist(), strict=True):
            if a:
                b.step()
        if progress is not None:
            progress()
    opt.zero_grad(set_to_none=True)
    fm.eval()
    return (total / count.clamp_min(1).double()).tolist()
