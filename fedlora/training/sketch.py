"""A client's side of an initialisation phase: projected gradients ``Lᵀ G_k R`` of the frozen weights.

For an adapted layer with input ``x`` (``T × d_in`` per row) and output gradient
``g = ∂L_k/∂y`` (``T × d_out``), the gradient of the frozen weight is ``G_k = Σ_t g_t x_tᵀ``
(``d_out × d_in``). A :class:`~fedlora.strategies.Probe` asks for ``Lᵀ G_k R``, computed from
the projected rows without ever forming ``G_k`` unless the probe is the identity::

    Lᵀ G_k R = Σ_t (Lᵀ g_t)(x_tᵀ R) = (g L)ᵀ (x R)        # (w_L or d_out) × (w_R or d_in)

So Fed-SB's range sketch ``G_k Ω`` costs a ``d_in × w`` matmul of the inputs, and ``Qᵀ G_k``
a ``d_out × w`` one of the output gradients.

* Without DP, the client's mean over ``steps`` batches of its loss's projected gradient
  (the batches of round 0 of its sampler, so every phase sees the same examples).
* With ``--dp sample``, each of ``steps`` Poisson batches gives the sum of every example's
  projected gradient clipped to ``C`` (one joint norm over all layers, from ``T × T`` Gram
  matrices of the projected rows), plus ``N(0, σ_k² C²)`` noise, over the expected batch;
  the result is their mean and every batch is one step of the client's budget. The noise has
  the size of the projection: ``w (d_in + d_out)`` numbers per layer for a sketch, not
  ``d_out d_in``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedlora.kernels.per_sample import dense_sq_norms, dense_weighted_sum, dense_weighted_sum_by_ids
from fedlora.models.lora import linear_shape
from fedlora.models.model import FederatedModel
from fedlora.privacy.accounting import Budget
from fedlora.privacy.dpsgd import (
    Capture,
    DPPass,
    clip_factors,
    noise_generator,
    noisy_mean,
    pass_sums,
    poisson_batches,
)
from fedlora.strategies import Probe
from fedlora.training.train import ClientSampler, TrainConfig, _step


def project(x: Tensor, g: Tensor, probe: Probe) -> tuple[Tensor, Tensor]:
    """``(x R, g L)`` of a layer's captured rows (``(N, T, ·)``; the identity where None)."""
    x, g = x.float(), g.float()
    xr = x if probe.right is None else x @ probe.right.to(x.device, x.dtype)   # (N, T, w_R or d_in)
    gl = g if probe.left is None else g @ probe.left.to(g.device, g.dtype)     # (N, T, w_L or d_out)
    return xr, gl


def client_sketches(fm: FederatedModel, data: dict[str, Tensor], samplers: Sequence[ClientSampler],
                    cfg: TrainConfig, steps: int, probes: dict[str, Probe],
                    budgets: Sequence[Budget] | None = None, phase: int = 0) -> dict[str, Tensor]:
    """Layer -> ``(m, ·, ·)``: slot k's (client k of ``samplers``) ``Lᵀ G_k R`` for each probed
    layer, privatised when ``cfg.dp_sample`` (see the module docstring).

    Raises
    ------
    RuntimeError
        Under DP, when a client's budget cannot cover the ``steps`` batches.
    """
    if len(samplers) > fm.num_clients:
        raise ValueError(f"{len(samplers)} samplers for a model with {fm.num_clients} slots")
    for s in samplers:
        s.start_round(0)
    layers = {name: fm.adapters[name] for name in probes}
    try:
        if cfg.dp_sample:
            return _private(fm, data, samplers, cfg, steps, probes, layers, budgets, phase)
        return _plain(fm, data, samplers, cfg, steps, probes, layers)
    finally:
        for p in fm.trainable_parameters():
            p.grad = None


def _plain(fm, data, samplers, cfg, steps, probes, layers) -> dict[str, Tensor]:
    m, device = len(samplers), next(fm.parameters()).device
    slots = torch.arange(m, device=device)
    ones = torch.ones(m * cfg.batch_size, device=device)
    sums: dict[str, Tensor] = {}
    for _ in range(steps):
        with Capture(list(layers.values())) as cap:  # one pass: each client's rows contiguous, equal
            _step(fm, data, samplers, slots, cfg, device, split=False, step=None)  # no dropout
        cap.group_rows(cfg.task.rows_per_example)
        for name, layer in layers.items():
            xr, gl = project(cap.x[layer], cap.g[layer], probes[name])
            got = dense_weighted_sum(xr, gl, ones, m).cpu() / steps
            sums[name] = sums[name] + got if name in sums else got
    return sums


def _private(fm, data, samplers, cfg, steps, probes, layers, budgets, phase) -> dict[str, Tensor]:
    device = next(fm.parameters()).device
    rates = [min(1.0, cfg.batch_size / len(s)) for s in samplers]
    expected = torch.tensor([q * len(s) for q, s in zip(rates, samplers, strict=True)])
    sums: dict[str, Tensor] = {}
    for step in range(steps):
        if not all(b.can_step() for b in budgets):
            raise RuntimeError("the privacy budget does not cover the initialisation's batches")
        packed = poisson_batches(samplers, rates, cfg.dp_reproducible)
        got, _ = pass_sums(fm, data, packed, cfg, device,
                           lambda dpp: projected_clipped_sums(dpp, layers, probes, cfg.max_grad_norm))
        gens = [noise_generator(s.seed, 0, phase * steps + step, cfg.dp_reproducible) for s in samplers]
        sigmas = torch.tensor([b.sigma for b in budgets])
        for name, summed in got.items():
            est = noisy_mean(summed, sigmas, cfg.max_grad_norm, expected, gens) / steps
            sums[name] = sums[name] + est if name in sums else est
        for b in budgets:
            b.step()
    return sums


def projected_clipped_sums(dpp: DPPass, layers: dict[str, nn.Module], probes: dict[str, Probe],
                           max_norm: float) -> dict[str, Tensor]:
    """Layer -> ``(m, ·, ·)``: each client's sum of its rows' ``Lᵀ G_i R``, every row clipped to
    ``max_norm`` jointly over ``layers`` (norms from ``T × T`` Gram matrices of the projected
    rows); zeros when no client drew a row."""
    if dpp.ids.numel() == 0:
        return {name: torch.zeros(dpp.m, *probes[name].shape(*linear_shape(layer)))
                for name, layer in layers.items()}
    rows = {name: project(dpp.cap.x[layer], dpp.cap.g[layer], probes[name]) for name, layer in layers.items()}
    sq = sum(dense_sq_norms(xr, gl) for xr, gl in rows.values())                   # (N,)
    c = clip_factors(sq, None, max_norm)
    return {name: dense_weighted_sum_by_ids(xr, gl, c, dpp.ids, dpp.m) for name, (xr, gl) in rows.items()}
