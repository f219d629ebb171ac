"""Factor algebra the strategies share: weights, averages, and ``‖ΔW‖`` / SVDs from factors only.

Every function takes LoRA factors (``A`` of shape ``(r, d_in)``, ``B`` of shape ``(d_out, r)``)
or lists of them, and none forms a ``d_out × d_in`` matrix unless that is the cheaper way
(``factored_sq_norm``). torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import ClientUpload, Factors, GlobalState


def client_weights(uploads: Sequence[ClientUpload]) -> list[float]:
    """``p_k = n_k / Σ n``; raises on an empty round or a non-positive count."""
    if not uploads:
        raise ValueError("cannot aggregate an empty round: no client replied")
    counts = [u.num_examples for u in uploads]
    if any(n <= 0 for n in counts):
        raise ValueError(f"every client needs num_examples > 0, got {counts}")
    total = float(sum(counts))
    return [n / total for n in counts]


def average_factor(uploads: Sequence[ClientUpload], weights: Sequence[float], layer: str,
                   factor: str) -> Tensor:
    """``Σ p_k A_k`` or ``Σ p_k B_k`` (``factor`` "A" or "B") of one layer."""
    i = ("A", "B").index(factor)
    return sum(p * u.factors[layer][i] for p, u in zip(weights, uploads, strict=True))


def average_head(uploads: Sequence[ClientUpload], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted average of the dense task-head tensors."""
    if not uploads[0].head:
        return {}
    return {key: sum(p * u.head[key] for p, u in zip(weights, uploads, strict=True))
            for key in uploads[0].head}


def factored_sq_norm(us: Sequence[Tensor], vs: Sequence[Tensor]) -> float:
    """``‖Σ_i U_i V_i‖_F²`` in float64, with ``U = [U_1 … U_m]``, ``V = [V_1; …; V_m]``.

    Small summed rank R: ``Σ (UᵀU) ⊙ (VVᵀ)`` (= ``tr((UᵀU)(VVᵀ))``, two R×R Grams, no R³
    product). Once ``R² > d_out·d_in / 2`` the dense ``‖U V‖_F²`` is cheaper and is used.
    """
    if not us:
        return 0.0
    U = torch.cat([u.double() for u in us], dim=1)        # (d_out, R)
    V = torch.cat([v.double() for v in vs], dim=0)        # (R, d_in)
    R = U.shape[1]
    if 2 * R * R > U.shape[0] * V.shape[1]:
        return float(torch.linalg.matrix_norm(U @ V) ** 2)
    return float(((U.T @ U) * (V @ V.T)).sum().clamp_min(0.0))


def ideal_factors(uploads: Sequence[ClientUpload], weights: Sequence[float],
                  layer: str, shared: Factors | None = None,
                  shared_scale: float = 1.0) -> tuple[list[Tensor], list[Tensor]]:
    """Factor lists of ``Σ p_k ΔW_k`` for one layer.

    LoRA: ``ΔW_k = s_k B_k A_k`` with each upload's scale. LoRA-SB (``shared`` given):
    ``ΔW_k = shared_scale · B R_k A`` with the shared ``(A, B)`` and the server's scale.
    """
    if shared is not None:  # Σ p_k s B R_k A = s B (Σ p_k R_k) A: one rank-r term
        A, B = shared
        R = sum(p * u.cores[layer].double() for p, u in zip(weights, uploads, strict=True))
        return [shared_scale * B.double() @ R], [A]
    us, vs = [], []
    for p, u in zip(weights, uploads, strict=True):
        A, B = u.factors[layer]
        us.append(p * u.scale * B)
        vs.append(A)
    return us, vs


def factored_svd(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, V)`` with ``B A = U diag(S) Vᵀ`` (float64), from the factors only.

    ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (reduced QR), then the SVD of the small core
    ``R_b R_aᵀ`` (R × R, R the rank of the factors): never a ``d × d`` SVD.
    """
    Qb, Rb = torch.linalg.qr(B.double())                     # (d_out, R), (R, R)
    Qa, Ra = torch.linalg.qr(A.double().T)                   # (d_in, R), (R, R)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T)                 # core (R, R)
    return Qb @ Uc, S, Qa @ Vch.T


def truncated_factors(A: Tensor, B: Tensor, scale: float, rank: int,
                      slot_scale: float) -> tuple[Factors, Tensor]:
    """The best rank-``rank`` approximation of ``scale · B A`` as LoRA factors for a slot of
    scale ``slot_scale``: ``((A_r, B_r), S)`` with ``slot_scale · B_r A_r = U_r Σ_r V_rᵀ``,
    split evenly (``B_r = U_r Σ_r^{1/2} / √s``, ``A_r = Σ_r^{1/2} V_rᵀ / √s``, s the slot
    scale; the design notes' ``A_r = Σ_r^{1/2} V_rᵀ`` would give ``√s U_r Σ_r V_rᵀ``) and
    zero-padded when ``B A`` has fewer than ``rank`` directions; ``S`` all singular values."""
    U, S, V = factored_svd(A, scale * B.double())
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    A_r = torch.zeros(rank, A.shape[1], dtype=torch.float64, device=A.device)
    B_r = torch.zeros(B.shape[0], rank, dtype=torch.float64, device=B.device)
    A_r[:k] = root[:, None] * V[:, :k].T / slot_scale ** 0.5
    B_r[:, :k] = U[:, :k] * root[None, :] / slot_scale ** 0.5
    return (A_r.to(A.dtype), B_r.to(B.dtype)), S


def relative_error(parts: dict[str, tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]]) -> float:
    """``sqrt(Σ_l ‖agg_l − ideal_l‖²) / sqrt(Σ_l ‖ideal_l‖²)`` from factor lists.

    ``parts[layer] = (agg_us, agg_vs, ideal_us, ideal_vs)``. Returns 0 when the ideal
    update is zero and the aggregate matches it.
    """
    num = den = 0.0
    for agg_us, agg_vs, id_us, id_vs in parts.values():
        num += factored_sq_norm(list(agg_us) + [-u for u in id_us], list(agg_vs) + list(id_vs))
        den += factored_sq_norm(id_us, id_vs)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


def residual_error(state: GlobalState) -> float:
    """What a truncated fold costs: ``sqrt(Σ_l ‖B_r A_r − B_m A_m‖²) / sqrt(Σ_l ‖B_m A_m‖²)`` over
    the layers, ``(A_m, B_m)`` the exact ``state.merged`` and ``(A_r, B_r)`` the ``state.residual``
    the model holds instead (0 when it holds ``merged`` exactly, or nothing was folded)."""
    if state.residual is None:
        return 0.0
    parts = {}
    for layer, (A, B) in state.merged.items():
        held = state.residual.get(layer)
        parts[layer] = ([held[1]] if held else [], [held[0]] if held else [], [B], [A])
    return relative_error(parts)
