"""Aggregation the server controls: client weights, norm bounding and robust means (torch only).

A reply claims ``n_k`` examples and carries client k's tensors; a dishonest client can lie about
both. :class:`Robust` wraps a strategy and applies up to three defences, in this order, before the
wrapped strategy aggregates:

1. **Weights.** ``weighting="uniform"`` sets every ``p_k = 1/K``; ``max_examples=N`` caps a claim,
   ``n_k ← min(n_k, N)``, so a client that claims 10⁹ examples weighs what an honest client
   holding ``N`` weighs.
2. **Norm bounding** (``norm_bound=M``, sum-only strategies). Client k's update is
   ``‖Δ_k‖² = Σ_l ‖ΔW_{k,l}‖²_F + ‖Δhead_k‖²`` over the adapted layers ``l``, with ``ΔW`` formed
   from factors only, never as a ``d_out × d_in`` matrix::

       LoRA     ΔW = s (B_k A_k − B̄ Ā) = U V,   U = [s B_k, −s B̄] (d_out × 2r), V = [A_k; Ā] (2r × d_in)
                ‖ΔW‖²_F = Σ_ij (UᵀU)_ij (V Vᵀ)_ij                     (2r × 2r Gram matrices)
       LoRA-SB  ΔW = s B (R_k − R̄) A
                ‖ΔW‖²_F = s² Σ_ij (ΔRᵀ BᵀB ΔR)_ij (A Aᵀ)_ij            (r × r)

   Every client above ``M ×`` the round's median norm is moved back toward the global state,
   ``θ_k ← θ̄ + c_k (θ_k − θ̄)`` over the tensors it uploads, with the largest ``c_k ≤ 1`` that
   brings its norm to the bound: ``c_k = bound / ‖Δ_k‖`` when ``ΔW`` is linear in the uploaded
   tensors (one factor, or the core ``R``), found by bisection when both ``A`` and ``B`` move.
3. **Robust mean** (``mean="trimmed"`` or ``"median"``, sum-only strategies): each uploaded
   tensor, coordinate by coordinate over the K clients, is replaced by its trimmed mean (the
   ``⌊βK⌋`` smallest and largest values dropped, ``β = trim``) or its median, unweighted. The
   wrapped strategy then aggregates that one synthetic upload (a weighted average of one upload
   is that upload), so ``agg_error`` is not reported. Neither this nor norm bounding runs under
   client-level DP, whose noise is calibrated to a sum of updates each clipped alone (a bound at
   M × the median lets one client move every other client's share).

   With ``mean="krum"`` (multi-Krum, Blanchard et al. 2017) no coordinate is replaced: the
   ``f = max(1, ⌊βK⌋)`` clients whose updates lie farthest from their ``K − f − 2`` nearest
   neighbours (sum of squared distances over the uploaded tensors, from one ``K × K`` Gram
   matrix) are left out, and the wrapped strategy aggregates the others with their weights, so
   ``agg_error`` is still reported. A sign-flipped update, whose norm is honest, sits about twice
   an honest update's norm from every other client and is the one left out.

A sum-only strategy is one whose aggregate is a weighted mean of the uploaded tensors starting
from the global ones (fedavg, fed-sb, ffa-lora, rolora; fedsa-lora for the robust mean only: its
``B`` stays on the clients, so the server cannot form ``ΔW``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from .base import Aggregate, ClientUpload, GlobalState, Strategy
from .dp import ClientLevelDP, Key, from_update, global_tensors, update_scale, updates
from .plan import AdapterPlan
from .wrap import Wrapped

WEIGHTINGS = ("examples", "uniform")
MEANS = ("mean", "trimmed", "median", "krum")


def update_norm(delta: dict[Key, Tensor], c: float, state: GlobalState, plan: AdapterPlan,
                scale: float) -> float:
    """``‖Δ‖`` of the update ``c · delta`` from ``state`` (module docstring), in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for layer, (A0, B0) in state.factors.items():
        A0, B0 = A0.double(), B0.double()
        if plan.core:
            dR = c * delta[("R", layer)].double()                              # (r, r)
            M = dR.T @ (B0.T @ B0) @ dR
            total += state.scale ** 2 * (M * (A0 @ A0.T)).sum()
            continue
        A = A0 + c * delta[("A", layer)].double() if ("A", layer) in delta else A0   # (r, d_in)
        B = B0 + c * delta[("B", layer)].double() if ("B", layer) in delta else B0   # (d_out, r)
        U = torch.cat([scale * B, -scale * B0], dim=1)                             # (d_out, 2r)
        V = torch.cat([A, A0], dim=0)                                              # (2r, d_in)
        total += ((U.T @ U) * (V @ V.T)).sum()
    for (kind, _), t in delta.items():
        if kind == "head":
            total += c ** 2 * (t.double() ** 2).sum()
    return float(total.clamp_min(0.0).sqrt())


def shrink(delta: dict[Key, Tensor], norm: float, bound: float, state: GlobalState, plan: AdapterPlan,
           scale: float) -> float:
    """The largest ``c ≤ 1`` (to bisection precision) with ``update_norm(delta, c) ≤ bound``;
    ``norm`` is ``update_norm(delta, 1)``."""
    if norm <= bound:
        return 1.0
    if plan.core or len([k for k in plan.upload if k in "AB"]) == 1:  # ΔW linear in the update
        return bound / norm
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if update_norm(delta, mid, state, plan, scale) <= bound else (lo, mid)
    return lo


def robust_mean(deltas: Sequence[dict[Key, Tensor]], mean: str, trim: float) -> dict[Key, Tensor]:
    """Coordinate-wise trimmed mean or median (the mean of the middle one or two values) of the
    clients' updates, unweighted; by sorting, so any tensor size works."""
    k = len(deltas)
    drop = (k - 1) // 2 if mean == "median" else int(trim * k)
    out = {}
    for key in deltas[0]:
        stack = torch.stack([d[key].double() for d in deltas])                    # (K, ...)
        kept = stack.sort(dim=0).values[drop:k - drop]
        out[key] = kept.mean(dim=0).to(deltas[0][key].dtype)
    return out


def krum_keep(deltas: Sequence[dict[Key, Tensor]], drop: int) -> list[int]:
    """Indices of the ``K − drop`` clients with the lowest Krum scores (sorted): a client's score is
    the sum of its squared distances to its ``K − drop − 2`` nearest other clients."""
    k = len(deltas)
    if drop < 1 or k - drop < 1:
        return list(range(k))
    flat = [torch.cat([d[key].double().flatten() for key in sorted(d)]) for d in deltas]
    X = torch.stack(flat)                                                       # (K, D)
    G = X @ X.T                                                                 # (K, K)
    dist = (G.diag()[:, None] + G.diag()[None, :] - 2 * G).clamp_min(0.0)      # squared distances
    near = max(k - drop - 2, 1)
    others = dist + torch.diag(torch.full((k,), float("inf"), dtype=dist.dtype))
    scores = others.sort(dim=1).values[:, :near].sum(dim=1)
    return sorted(int(i) for i in scores.argsort()[:k - drop])


class Robust(Wrapped):
    """Server-controlled weights, norm bounding and robust means around ``inner`` (module docstring).

    Parameters
    ----------
    inner : Strategy
        The wrapped strategy (possibly :class:`ClientLevelDP`).
    weighting : {"examples", "uniform"}
        ``p_k ∝ n_k`` (after the cap) or ``1/K``.
    max_examples : int
        Cap on a client's claimed ``n_k``; 0: no cap.
    norm_bound : float
        ``M``: bound each update's norm by ``M ×`` the round's median; 0: off.
    mean : {"mean", "trimmed", "median", "krum"}
        What replaces the clients' tensors before aggregating: nothing, a robust mean, or (krum)
        the clients that multi-Krum keeps.
    trim : float
        ``β`` of the trimmed mean, in [0, 0.5); with krum, ``max(1, ⌊βK⌋)`` clients are left out.

    Attributes
    ----------
    capped : int
        Claims above the cap in the last round.
    bounded, dropped : list
        The uploads the norm bound moved and those Krum left out in the last round, each by its
        client id (:attr:`ClientUpload.client`; its position among the uploads when unknown).
    """

    def __init__(self, inner: Strategy, weighting: str = "examples", max_examples: int = 0,
                 norm_bound: float = 0.0, mean: str = "mean", trim: float = 0.1) -> None:
        super().__init__(inner)
        if weighting not in WEIGHTINGS or mean not in MEANS:
            raise ValueError(f"weighting is one of {WEIGHTINGS} and mean one of {MEANS}")
        if max_examples < 0 or not 0 <= norm_bound < math.inf or not 0 <= trim < 0.5:
            raise ValueError(f"max_examples ≥ 1 (0: no cap), a finite norm_bound ≥ 0 and 0 ≤ trim < 0.5;"
                             f" got {max_examples}, {norm_bound}, {trim}")
        robust = [(what, flag) for what, flag, on in (("norm bounding", "--norm-bound", norm_bound),
                                                      ("a robust mean", "--robust-mean", mean != "mean"))
                  if on]
        if robust and not inner.sum_only:
            what, flags = (" and ".join(names) for names in zip(*robust, strict=True))
            raise ValueError(f"{what} can only run on a sum-only strategy (fedavg, fed-sb, ffa-lora, rolora,"
                             f" fedsa-lora); {inner.name} does not average what clients send: drop {flags}"
                             " or choose one of those")
        if norm_bound and any(inner.plan(r).keep for r in (1, 2)):
            raise ValueError(f"norm bounding needs each client's whole update; {inner.name} keeps"
                             " factors on the clients, so the server cannot measure it: drop --norm-bound")
        if robust and isinstance(inner, ClientLevelDP):
            # the bound is M × the round's median norm: one client's update moves every other
            # client's scale, so the released sum moves by more than the clip its noise is set for
            what, flags = (" and ".join(names) for names in zip(*robust, strict=True))
            raise ValueError(f"{what} cannot run under client-level DP: its noise is calibrated to a sum of"
                             f" updates each clipped to --update-clip alone; drop {flags} or --dp client")
        self.weighting, self.max_examples, self.norm_bound = weighting, max_examples, norm_bound
        self.mean, self.trim = mean, trim
        self.capped, self.bounded, self.dropped = 0, [], []

    @property
    def active(self) -> bool:
        """True when anything differs from the wrapped strategy's own aggregation."""
        return (self.weighting != "examples" or self.max_examples > 0 or self.norm_bound > 0
                or self.mean != "mean")

    def weigh(self, uploads: Sequence[ClientUpload]) -> list[ClientUpload]:
        """The uploads with the server's weights (uniform, or claims capped)."""
        self.capped = sum(self.max_examples > 0 and u.num_examples > self.max_examples for u in uploads)
        if self.weighting == "uniform":
            return [replace(u, num_examples=1) for u in uploads]
        if self.max_examples:
            return [replace(u, num_examples=min(u.num_examples, self.max_examples)) for u in uploads]
        return list(uploads)

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        """Weights, then norm bounding, then the robust mean; the wrapped strategy aggregates."""
        uploads = self.weigh(uploads)
        self.bounded, self.dropped = [], []
        ids = [i if u.client is None else u.client for i, u in enumerate(uploads)]
        if not self.norm_bound and self.mean == "mean":
            return self.inner.aggregate(uploads, state)
        plan = self.plan(state.round + 1)
        start = global_tensors(state, plan)
        deltas = updates(uploads, start, plan)
        scale = update_scale(state, plan, uploads[0])
        if self.norm_bound:
            norms = [update_norm(d, 1.0, state, plan, scale) for d in deltas]
            bound = self.norm_bound * statistics.median(norms)
            factors = [shrink(d, n, bound, state, plan, scale) for d, n in zip(deltas, norms, strict=True)]
            self.bounded = [c for c, f in zip(ids, factors, strict=True) if f < 1.0]
            # the bounded clients moved back, the others as they are
            uploads = [u if c == 1.0 else from_update({key: c * t for key, t in d.items()}, start, state,
                                                      plan, scale, u.num_examples)
                       for c, d, u in zip(factors, deltas, uploads, strict=True)]
            deltas = [{key: c * t for key, t in d.items()} for c, d in zip(factors, deltas, strict=True)]
        if self.mean == "mean":
            return self.inner.aggregate(uploads, state)
        if self.mean == "krum":
            keep = krum_keep(deltas, max(1, int(self.trim * len(deltas))))
            self.dropped = [c for i, c in enumerate(ids) if i not in keep]
            return self.inner.aggregate([uploads[i] for i in keep], state)
        centre = robust_mean(deltas, self.mean, self.trim)
        inner = self.inner.aggregate([from_update(centre, start, state, plan, scale)], state)
        return Aggregate(state=inner.state, fold={}, agg_error=None)

    def round_report(self) -> dict[str, object]:
        """The inner columns, and what the defences did in the last round."""
        return {**self.inner.round_report(), "capped_claims": self.capped, "norm_bounded": len(self.bounded),
                "norm_bounded_clients": self.bounded, "krum_left_out": len(self.dropped),
                "krum_dropped": self.dropped}

    def describe(self) -> dict[str, object]:
        return {**self.inner.describe(), "weighting": self.weighting, "max_examples": self.max_examples,
                "norm_bound": self.norm_bound, "robust_mean": self.mean, "trim": self.trim}
