"""Batched per-client adapter ops, each beside its slow reference.

Every op here computes, for a batch whose rows belong to different clients, the
client-specific part of a linear layer's output. Row ``i`` of the batch belongs to
client slot ``ids[i]``; the shared frozen part ``x W0ᵀ`` is computed by the caller
with one ordinary GEMM for all rows.

Two execution paths share one :class:`Routing`:

* **segments** (the fast path): the rows form ``S`` contiguous, equal-sized
  segments, one per slot in ``routing.slots``. The op is then two ``torch.bmm``
  calls over ``(S, n*T, ·)`` views: no copy of ``x`` and no loop over clients.
* **gather** (any order, any segment sizes): each row gathers its own client's
  factors, ``A[ids]`` of shape ``(N, r, d_in)``, and the op is a per-row ``bmm``.
  It costs ``N·r·(d_in+d_out)`` extra numbers, which is small for LoRA ranks.

The ``*_reference`` functions loop over rows in Python; tests compare against them.
Only torch is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Routing:
    """Which client slot each batch row belongs to.

    Attributes
    ----------
    ids : Tensor
        ``(N,)`` long tensor, the slot of each row.
    slots : Tensor or None
        ``(S,)`` slots of the equal contiguous segments, or None when the rows are not
        in that form (then the gather path is used).
    in_order : bool
        True when ``slots`` is exactly ``0, 1, …, S-1`` (then a model with S slots
        needs no gather). Decided once per batch, so the ops never sync with the host.
    """

    ids: Tensor
    slots: Tensor | None
    in_order: bool = False

    @staticmethod
    def from_ids(ids: Tensor) -> Routing:
        """Detect equal contiguous segments in ``ids`` (one host sync per batch)."""
        ids = ids.long()
        n_rows = ids.numel()
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        seg = counts[0].item() if n_rows else 0
        equal = (n_rows > 0 and bool((counts == seg).all())
                 and values.numel() == torch.unique(values).numel())
        if not equal:
            return Routing(ids=ids, slots=None)
        return Routing(ids=ids, slots=values, in_order=_in_order(values))

    @staticmethod
    def segments(slots: Tensor, rows_per_slot: int) -> Routing:
        """Routing for ``len(slots)`` contiguous segments of ``rows_per_slot`` rows."""
        slots = slots.long()
        return Routing(ids=slots.repeat_interleave(rows_per_slot), slots=slots,
                       in_order=_in_order(slots))


def _in_order(slots: Tensor) -> bool:
    return slots.tolist() == list(range(slots.numel()))


def _as_segments(x: Tensor, n_seg: int) -> Tensor:
    # (N, ..., d) -> (S, N/S * ..., d): a view, since segments are contiguous.
    return x.reshape(n_seg, -1, x.shape[-1])


def _as_rows(x: Tensor) -> Tensor:
    # (N, ..., d) -> (N, T, d) with T = prod of the middle dims (1 for a 2-D input).
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _pick(t: Tensor, routing: Routing) -> Tensor:
    # The segments' slots of a stacked per-client tensor; no gather when they are 0..K-1.
    if routing.in_order and routing.slots.numel() == t.shape[0]:
        return t
    return t.index_select(0, routing.slots)


def lora_delta(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, routing: Routing) -> Tensor:
    """Per-client LoRA term ``scale_k · x A_kᵀ B_kᵀ`` for every row.

    Parameters
    ----------
    x : Tensor
        ``(N, ..., d_in)`` layer input; row ``i`` belongs to slot ``routing.ids[i]``.
    A : Tensor
        ``(K, r, d_in)`` down-projections.
    B : Tensor
        ``(K, d_out, r)`` up-projections.
    scale : Tensor
        ``(K,)`` per-client scale ``α / r_k``.
    routing : Routing
        Row-to-slot assignment.

    Returns
    -------
    Tensor
        ``(N, ..., d_out)``.
    """
    out_shape = (*x.shape[:-1], B.shape[1])
    if routing.slots is not None:
        a, b, sc = _pick(A, routing), _pick(B, routing), _pick(scale, routing)
        xs = _as_segments(x, routing.slots.numel())          # (S, n*T, d_in)
        h = torch.bmm(xs, a.transpose(1, 2))                 # (S, n*T, r)
        y = torch.bmm(h, b.transpose(1, 2))                  # (S, n*T, d_out)
        return (y * sc.view(-1, 1, 1).to(y.dtype)).reshape(out_shape)
    ids = routing.ids
    xr = _as_rows(x)                                         # (N, T, d_in)
    h = torch.bmm(xr, A[ids].transpose(1, 2))                # (N, T, r)
    y = torch.bmm(h, B[ids].transpose(1, 2))                 # (N, T, d_out)
    return (y * scale[ids].view(-1, 1, 1).to(y.dtype)).reshape(out_shape)


def lora_delta_reference(x: Tensor, A: Tensor, B: Tensor, scale: Tensor, ids: Tensor) -> Tensor:
    """Row-by-row loop for :func:`lora_delta`."""
    rows = []
    for i in range(x.shape[0]):
        k = int(ids[i])
        rows.append(scale[k] * (x[i] @ A[k].T @ B[k].T))
    return torch.stack(rows)


def sb_delta(x: Tensor, A: Tensor, B: Tensor, R: Tensor, scale: float | Tensor,
             routing: Routing) -> Tensor:
    """LoRA-SB term ``scale · x Aᵀ R_kᵀ Bᵀ`` with A, B shared by all clients.

    Parameters
    ----------
    x : Tensor
        ``(N, ..., d_in)``.
    A : Tensor
        ``(r, d_in)`` shared, frozen.
    B : Tensor
        ``(d_out, r)`` shared, frozen.
    R : Tensor
        ``(K, r, r)`` per-client trainable cores.
    scale : float or 0-d Tensor
        Constant scale.
    routing : Routing
        Row-to-slot assignment.
    """
    h = x @ A.T                                              # (N, ..., r): one GEMM, shared
    if routing.slots is not None:
        hs = _as_segments(h, routing.slots.numel())          # (S, n*T, r)
        g = torch.bmm(hs, _pick(R, routing).transpose(1, 2))
    else:
        g = torch.bmm(_as_rows(h), R[routing.ids].transpose(1, 2))
    return scale * (g.reshape(h.shape) @ B.T)                # (N, ..., d_out)


def sb_delta_reference(x: Tensor, A: Tensor, B: Tensor, R: Tensor, scale: float, ids: Tensor) -> Tensor:
    """Row-by-row loop for :func:`sb_delta`."""
    return torch.stack(
        [scale * (x[i] @ A.T @ R[int(ids[i])].T @ B.T) for i in range(x.shape[0])]
    )


def dense_delta(x: Tensor, W: Tensor, routing: Routing, bias: Tensor | None = None) -> Tensor:
    """Per-client dense linear map ``x W_kᵀ (+ b_k)``.

    Used for per-client task heads, and with a zero ``W`` as a probe whose gradient
    is each client's gradient of the shared frozen weight: ``∂L/∂W_k = Σ_t g_t x_tᵀ``
    over client k's rows.

    Parameters
    ----------
    x : Tensor
        ``(N, ..., d_in)``.
    W : Tensor
        ``(K, d_out, d_in)``.
    routing : Routing
        Row-to-slot assignment.
    bias : Tensor, optional
        ``(K, d_out)``.
    """
    out_shape = (*x.shape[:-1], W.shape[1])
    if routing.slots is not None:
        w = _pick(W, routing)
        y = torch.bmm(_as_segments(x, routing.slots.numel()), w.transpose(1, 2))  # (S, n*T, d_out)
        if bias is not None:
            y = y + _pick(bias, routing).unsqueeze(1)
        return y.reshape(out_shape)
    ids = routing.ids
    y = torch.bmm(_as_rows(x), W[ids].transpose(1, 2))                  # (N, T, d_out)
    if bias is not None:
        y = y + bias[ids].unsqueeze(1)
    return y.reshape(out_shape)


def dense_delta_reference(
    x: Tensor, W: Tensor, ids: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Row-by-row loop for :func:`dense_delta`."""
    rows = []
    for i in range(x.shape[0]):
        k = int(ids[i])
        y = x[i] @ W[k].T
        rows.append(y + bias[k] if bias is not None else y)
    return torch.stack(rows)
