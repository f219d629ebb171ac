"""Sample-level DP-SGD for the K clients of a pass, in one forward/backward.

One step, for every client k of the pass (each with its own sampling rate
``q_k = batch_size / n_k``, noise multiplier ``σ_k`` and :class:`~fedlora.privacy.Budget`):

1. **Poisson sampling**: each of the client's examples joins the batch with
   probability ``q_k``. Draws and noise come from OS entropy; ``--dp-reproducible``
   keys them to (client seed, round, step) instead, so the simulator, a deployment
   and a resumed run agree, for tests only (knowing the seed removes the privacy).
   Batches differ in size, so every client's segment is padded to the largest with
   zero-weight rows.
2. One forward/backward of ``Σ_i w_i ℓ_i`` over all rows (``w_i = 0`` on padding).
   Hooks keep each adapted layer's input ``x`` and output gradient ``g``; since
   examples do not interact, ``g_i`` is the gradient of example i's own loss.
3. Per-example gradients of every trainable tensor (``kernels.per_sample``), their
   joint norm, clipping to ``C`` (``--max-grad-norm``): ``c_i = min(1, C / ‖∇ℓ_i‖)``.
4. Client k's gradient is ``(Σ_{i∈k} c_i ∇ℓ_i + σ_k C ξ_k) / (q_k n_k)``, ``ξ_k`` standard
   normal from the client's own generator, then one stacked AdamW
   step (elementwise, so K independent ones). A client whose budget cannot afford the
   step sits it out (its slot is restored after the step).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fedlora.kernels import Routing
from fedlora.kernels.per_sample import (
    dense_grad_sample,
    dense_sq_norms,
    dense_weighted_sum,
    lora_grad_sample,
    sb_grad_sample,
)
from fedlora.lora import BatchedLinear
from fedlora.privacy import Budget, GaussianNoise
from fedlora.tasks import gather_rows


class Capture:
    """Forward hooks that keep each adapter/head layer's input and output gradient."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.x: dict[nn.Module, Tensor] = {}
        self.g: dict[nn.Module, Tensor] = {}
        self.handles = []

    def __enter__(self) -> Capture:
        for m in self.modules:
            self.handles.append(m.register_forward_hook(self._hook))
        return self

    def _hook(self, module, inputs, output) -> None:
        self.x[module] = inputs[0].detach()
        if output.requires_grad:
            output.register_hook(lambda grad, m=module: self.g.__setitem__(m, grad.detach()))

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def layer_grad_samples(layer: nn.Module, x: Tensor, g: Tensor,
                       ids: Tensor) -> list[tuple[nn.Parameter, Tensor]]:
    """One adapter or head layer's ``(parameter, (N, *parameter.shape[1:]))`` per-example
    gradients, from its input ``x``, output gradient ``g`` and the rows' slots ``ids``."""
    if isinstance(layer, BatchedLinear):
        gW, gb = dense_grad_sample(x, g)
        return [(layer.weight, gW), (layer.bias, gb)]
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


def clip_factors(sq_norms: Tensor, weights: Tensor, max_norm: float) -> Tensor:
    """``w_i · min(1, C / ‖∇ℓ_i‖)`` (padding rows have ``w_i = 0``)."""
    return weights * (max_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)


def poisson_batches(samplers, rates: Sequence[float],
                    reproducible: bool = False) -> tuple[list[int], Tensor, int]:
    """Each client's Poisson batch, padded to one length L: ``(indices, weights, L)``.

    The draws are secret (OS entropy) unless ``reproducible``: privacy amplification by
    sampling assumes the adversary does not know which examples were drawn.
    """
    picks = []
    for s, q in zip(samplers, rates, strict=True):
        rng = s.rng if reproducible else np.random.default_rng(secrets.randbits(128))
        keep = rng.random(len(s.indices)) < q
        picks.append(s.indices[keep].tolist())
    L = max(1, max(len(p) for p in picks))
    idx, w = [], []
    for s, p in zip(samplers, picks, strict=True):
        idx += p + [int(s.indices[0])] * (L - len(p))
        w += [1.0] * len(p) + [0.0] * (L - len(p))
    return idx, torch.tensor(w), L


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


def _forward(fm, data, samplers, cfg, rates, device):
    """Poisson batches, one forward/backward with capture; ``(cap, ids, w, L, losses)``."""
    idx, w, L = poisson_batches(samplers, rates, cfg.dp_reproducible)
    m = len(samplers)
    batch = gather_rows(data, idx, device, cfg.pad_to_longest)
    labels = batch.pop("labels")
    slots = torch.arange(m, device=device)
    w = w.to(device)
    positions = cfg.task.logit_positions(labels)
    with Capture(fm.client_layers()) as cap:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = fm(routing=Routing.segments(slots, L), positions=positions, **batch)
        losses = cfg.task.row_losses(out.logits, labels, positions)
        (losses * w).sum().backward()
    return cap, slots.repeat_interleave(L), w, L, losses.detach()


def dp_train_clients(fm, data: dict[str, Tensor], samplers, cfg, budgets: Sequence[Budget],
                     rnd: int, progress=None) -> list[float]:
    """DP-SGD for slots ``0..m-1`` (one per sampler); each client's mean batch loss."""
    m = len(samplers)
    for s in samplers:
        s.start_round(rnd)
    device = next(fm.parameters()).device
    params = fm.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rates = [min(1.0, cfg.batch_size / len(s)) for s in samplers]
    expected = torch.tensor([q * len(s) for q, s in zip(rates, samplers, strict=True)])
    total, count = torch.zeros(m, dtype=torch.float64), torch.zeros(m)
    fm.train()
    for step in range(cfg.local_steps):
        active = torch.tensor([b.can_step() for b in budgets])
        if not active.any():
            break
        opt.zero_grad(set_to_none=True)
        cap, ids, w, L, losses = _forward(fm, data, samplers, cfg, rates, device)
        gs = grad_samples(fm, cap, ids)
        sq = sum(gr.reshape(gr.shape[0], -1).pow(2).sum(dim=1) for _, gr in gs)
        c = clip_factors(sq, w, cfg.max_grad_norm)
        gens = [noise_generator(s.seed, rnd, step, cfg.dp_reproducible) for s in samplers]
        sigmas = torch.tensor([b.sigma for b in budgets])
        for p, gr in gs:
            summed = (c.view(-1, *[1] * (gr.dim() - 1)) * gr).reshape(m, L, *gr.shape[1:]).sum(1)
            grad = noisy_mean(summed, sigmas, cfg.max_grad_norm, expected, gens) * _bcast(active, summed)
            p.grad = torch.zeros_like(p)
            p.grad[:m] = grad.to(p.device, p.dtype)
        keep = [p.detach()[:m].clone() for p in params]
        opt.step()
        with torch.no_grad():
            for p, old in zip(params, keep, strict=True):
                p[:m][~active.to(p.device)] = old[~active.to(p.device)]
        seg = (losses * w).view(m, L).sum(1).double().cpu()
        total += seg * active
        count += (w.view(m, L).sum(1).cpu()) * active
        for b, a in zip(budgets, active.tolist(), strict=True):
            if a:
                b.step()
        if progress is not None:
            progress()
    opt.zero_grad(set_to_none=True)
    fm.eval()
    return (total / count.clamp_min(1).double()).tolist()


def dp_estimate_gradients(fm, data, samplers, cfg, budgets: Sequence[Budget],
                          steps: int) -> dict[str, Tensor]:
    """Fed-SB's gradient estimates under DP: layer -> ``(m, d_out, d_in)``.

    Each of ``steps`` Poisson batches gives, per client, the clipped sum of the
    examples' gradients of the frozen weights (joint norm over all adapted layers;
    norms from Gram matrices) plus ``N(0, σ_k² C²)``, over the expected batch; the
    estimate is their mean. Every batch is one step of the client's budget.
    """
    m = len(samplers)
    for s in samplers:
        s.start_round(0)
    device = next(fm.parameters()).device
    rates = [min(1.0, cfg.batch_size / len(s)) for s in samplers]
    expected = torch.tensor([q * len(s) for q, s in zip(rates, samplers, strict=True)])
    sums: dict[str, Tensor] = {}
    for step in range(steps):
        if not all(b.can_step() for b in budgets):
            raise RuntimeError("the privacy budget does not cover Fed-SB's gradient estimate")
        cap, ids, w, L, _ = _forward(fm, data, samplers, cfg, rates, device)
        layers = list(fm.adapters.items())
        sq = sum(dense_sq_norms(cap.x[layer], cap.g[layer]) for _, layer in layers)
        c = clip_factors(sq, w, cfg.max_grad_norm)
        gens = [noise_generator(s.seed, 0, step, cfg.dp_reproducible) for s in samplers]
        sigmas = torch.tensor([b.sigma for b in budgets])
        for name, layer in layers:
            summed = dense_weighted_sum(cap.x[layer], cap.g[layer], c, m)
            est = noisy_mean(summed, sigmas, cfg.max_grad_norm, expected, gens)
            sums[name] = sums.get(name, 0) + est / steps
        for p in fm.trainable_parameters():
            p.grad = None
        for b in budgets:
            b.step()
    return sums
