"""Per-example gradients of the batched adapter ops (for DP-SGD), each beside a reference.

For a layer whose row ``i`` (one example, ``T`` tokens) has input ``x_i`` (``T × d_in``)
and output gradient ``g_i = ∂ℓ_i/∂y_i`` (``T × d_out``), the gradients of that example's
own loss ``ℓ_i`` are (``s`` the LoRA scale):

* LoRA, ``y = s · x Aᵀ Bᵀ``:      ``∂ℓ_i/∂B = s · g_iᵀ (x_i Aᵀ)``  (``d_out × r``),
                                  ``∂ℓ_i/∂A = s · (g_i B)ᵀ x_i``   (``r × d_in``);
* LoRA-SB, ``y = s · x Aᵀ Rᵀ Bᵀ``: ``∂ℓ_i/∂R = s · (g_i B)ᵀ (x_i Aᵀ)`` (``r × r``);
* dense, ``y = x Wᵀ + b``:        ``∂ℓ_i/∂W = g_iᵀ x_i``, ``∂ℓ_i/∂b = Σ_t g_{i,t}``.

Each is two batched matmuls over the rows, about the cost of the ordinary weight
gradient, and holds ``N·r·(d_in + d_out)`` numbers for LoRA (less than ``x`` itself
when ``r < T``). For the dense gradient of a frozen weight (Fed-SB's gradient estimate)
only the norms are formed per example, from ``T × T`` Gram matrices
(``‖g_iᵀ x_i‖² = Σ_{t,t'} (g_t·g_t')(x_t·x_t')``); the clipped sum is then one matmul
per segment (:func:`dense_weighted_sum`) or per client (:func:`dense_weighted_sum_by_ids`).

``A`` and ``B`` here are already per row (``A[ids]``) and already rank-masked, so the
gradients of masked entries come out exactly zero. Only torch is imported here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rows(t: Tensor) -> Tensor:
    """``(N, ..., d)`` -> ``(N, T, d)`` (a single token per row becomes ``T = 1``)."""
    return t.reshape(t.shape[0], -1, t.shape[-1]).float()


def lora_grad_sample(x: Tensor, g: Tensor, A: Tensor, B: Tensor, scale: Tensor,
                     want_A: bool = True, want_B: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Per-row ``(∂ℓ_i/∂A (N, r, d_in), ∂ℓ_i/∂B (N, d_out, r))``; None for a frozen factor
    (``want_A`` / ``want_B`` False: FFA-LoRA's A, RoLoRA's frozen half).

    Parameters
    ----------
    x, g : Tensor
        ``(N, ..., d_in)`` inputs and ``(N, ..., d_out)`` output gradients.
    A, B : Tensor
        ``(N, r, d_in)`` and ``(N, d_out, r)``: each row's client factors.
    scale : Tensor
        ``(N,)`` each row's LoRA scale.
    """
    x, g = _rows(x), _rows(g)
    s = scale.float().view(-1, 1, 1)
    gA = gB = None
    if want_B:
        u = torch.bmm(x, A.float().transpose(1, 2))           # (N, T, r)
        gB = s * torch.bmm(g.transpose(1, 2), u)              # (N, d_out, r)
    if want_A:
        v = torch.bmm(g, B.float())                           # (N, T, r)
        gA = s * torch.bmm(v.transpose(1, 2), x)              # (N, r, d_in)
    return gA, gB


def sb_grad_sample(x: Tensor, g: Tensor, A: Tensor, B: Tensor, scale: float | Tensor) -> Tensor:
    """Per-row ``∂ℓ_i/∂R`` ``(N, r, r)`` with the shared ``A (r, d_in)``, ``B (d_out, r)``."""
    x, g = _rows(x), _rows(g)
    u = x @ A.float().T                                       # (N, T, r)
    v = g @ B.float()                                         # (N, T, r)
    return float(scale) * torch.bmm(v.transpose(1, 2), u)    # (N, r, r)


def dense_grad_sample(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``(∂ℓ_i/∂W (N, d_out, d_in), ∂ℓ_i/∂b (N, d_out))``."""
    x, g = _rows(x), _rows(g)
    return torch.bmm(g.transpose(1, 2), x), g.sum(dim=1)


def dense_sq_norms(x: Tensor, g: Tensor) -> Tensor:
    """``(N,)`` squared norms ``‖g_iᵀ x_i‖²_F`` from ``T × T`` Gram matrices (no ``d × d`` per row)."""
    x, g = _rows(x), _rows(g)
    return (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))).sum(dim=(1, 2))


def dense_weighted_sum(x: Tensor, g: Tensor, weights: Tensor, segments: int) -> Tensor:
    """``(S, d_out, d_in)``: ``Σ_{i ∈ segment k} w_i g_iᵀ x_i`` over ``S`` equal contiguous segments."""
    x, g = _rows(x), _rows(g)
    gw = g * weights.float().view(-1, 1, 1)
    n = x.shape[0] // segments
    xs = x.reshape(segments, n * x.shape[1], x.shape[2])
    gs = gw.reshape(segments, n * g.shape[1], g.shape[2])
    return torch.bmm(gs.transpose(1, 2), xs)


def dense_weighted_sum_by_ids(x: Tensor, g: Tensor, weights: Tensor, ids: Tensor, m: int) -> Tensor:
    """``(m, d_out, d_in)``: ``Σ_{i : ids_i = k} w_i g_iᵀ x_i`` for every client ``k < m``.

    Clients may have any number of rows (zero gives a zero sum) in any order; the rows are
    grouped by client (one stable sort, one host sync for the counts), then each client's
    sum is one matmul over its ``n_k·T`` tokens.

    Parameters
    ----------
    x, g : Tensor
        ``(N, ..., d_in)`` inputs and ``(N, ..., d_out)`` output gradients.
    weights : Tensor
        ``(N,)`` row weights (the clipping factors).
    ids : Tensor
        ``(N,)`` long: the client of each row, in ``0..m-1``.
    m : int
        Number of clients.
    """
    x, g = _rows(x), _rows(g)
    gw = g * weights.float().view(-1, 1, 1)                  # (N, T, d_out)
    out = x.new_zeros(m, g.shape[2], x.shape[2])             # (m, d_out, d_in)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=m).tolist()
    for k, (xk, gk) in enumerate(zip(torch.split(x[order], counts), torch.split(gw[order], counts),
                                     strict=True)):
        if xk.shape[0]:
            out[k] = gk.reshape(-1, gk.shape[2]).T @ xk.reshape(-1, xk.shape[2])
    return out


# ---- slow references: one example at a time, through autograd ----

def lora_grad_sample_reference(x: Tensor, g: Tensor, A: Tensor, B: Tensor,
                               scale: Tensor) -> tuple[Tensor, Tensor]:
    """Row-by-row autograd of ``⟨g_i, s · x_i Aᵀ Bᵀ⟩`` for :func:`lora_grad_sample`."""
    gA, gB = [], []
    for i in range(x.shape[0]):
        a = A[i].detach().float().clone().requires_grad_(True)
        b = B[i].detach().float().clone().requires_grad_(True)
        y = float(scale[i]) * (x[i].float() @ a.T @ b.T)
        da, db = torch.autograd.grad((y * g[i].float()).sum(), (a, b))
        gA.append(da)
        gB.append(db)
    return torch.stack(gA), torch.stack(gB)


def sb_grad_sample_reference(x: Tensor, g: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """Row-by-row autograd for :func:`sb_grad_sample`."""
    out = []
    for i in range(x.shape[0]):
        R = torch.zeros(A.shape[0], A.shape[0], requires_grad=True)
        y = float(scale) * (x[i].float() @ A.float().T @ R.T @ B.float().T)
        out.append(torch.autograd.grad((y * g[i].float()).sum(), R)[0])
    return torch.stack(out)


def dense_grad_sample_reference(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Row-by-row autograd for :func:`dense_grad_sample`."""
    gW, gb = [], []
    for i in range(x.shape[0]):
        W = torch.zeros(g.shape[-1], x.shape[-1], requires_grad=True)
        b = torch.zeros(g.shape[-1], requires_grad=True)
        y = x[i].float() @ W.T + b
        dW, db = torch.autograd.grad((y * g[i].float()).sum(), (W, b))
        gW.append(dW)
        gb.append(db)
    return torch.stack(gW), torch.stack(gb)
