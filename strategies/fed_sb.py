"""Fed-SB: LoRA-SB adapters, ``ΔW_k = s · B R_k A`` with A, B frozen and shared.

**Initialisation** (LoRA-SB, arXiv 2411.19557, computed federatedly; option ``init``).
LoRA-SB starts from the best rank-r approximation of a first full fine-tuning step,
estimated from ``Ḡ = Σ p_k G_k``, ``G_k`` client k's gradient of its loss with respect
to an adapted frozen weight (``d_out × d_in``, over ``--init-batches`` local batches).

* ``sketch`` (default): a federated randomized range finder, two phases of small uploads
  that are sums only (secure aggregation, DP). The server sends a Gaussian ``Ω``
  (``d_in × w``, drawn from the seed); clients upload ``Y_k = G_k Ω`` (``d_out × w``); the
  server orthonormalises ``Σ p_k Y_k = Q T`` and sends ``Q``; clients upload ``Z_k = Qᵀ G_k``
  (``w × d_in``); the server takes the SVD of ``Z̄ = Σ p_k Z_k = Ũ Σ Vᵀ`` (``w × d_in``), so
  ``Ḡ ≈ Q Z̄ = (Q Ũ) Σ Vᵀ`` (exact when ``w ≥ rank(Ḡ)``). A sketch is linear in ``G``, so
  this path factors the SGD-like step ``ΔŴ = −c · Ḡ``, with ``c = η √(d_out d_in) / ‖Z̄‖_F``
  giving it the Frobenius norm of the sign step below (``‖Z̄‖_F = ‖Qᵀ Ḡ‖_F ≈ ‖Ḡ‖_F``).
  Each client sends ``w (d_out + d_in)`` numbers per layer instead of ``d_out d_in``.
* ``dense``: clients upload ``G_k`` itself; the step is LoRA-SB's Adam-like first step,
  sign descent ``ΔŴ = −η · sign(Ḡ)`` (a sign is not linear, so it needs the dense sum).
* ``seed``: no data is read: A and B are random orthonormal factors drawn from the seed
  and ``R_0 = 0``.

``--init-data FILE`` runs the ``sketch``/``dense`` phases on the server over a public file
(no upload, no privacy cost). From ``ΔŴ ≈ U_r Σ_r V_rᵀ`` (randomized SVD, never a full SVD
of a ``d × d`` matrix):

    B = U_r            (d_out × r, orthonormal columns, frozen)
    A = V_rᵀ           (r × d_in, orthonormal rows, frozen)
    R_0 = Σ_r / s      (r × r, trained)

so that training starts from ``W0 + s B R_0 A ≈ W0 + ΔŴ``.

**Rounds** average R only: ``R̄ = Σ p_k R_k``. Because B and A are common,
``s B R̄ A = Σ p_k s B R_k A`` exactly: the aggregation error is zero up to rounding.
Each client uploads and downloads ``r²`` numbers per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import (
    Aggregate,
    ClientUpload,
    Factors,
    GlobalState,
    Option,
    Probe,
    Strategy,
    register_strategy,
)
from .factors import (
    average_head,
    client_weights,
    ideal_factors,
    relative_error,
)
from .plan import AdapterPlan


def low_rank_factors(delta: Tensor, rank: int, seed: int = 0, niter: int = 4,
                     oversample: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` ``(U, S, V)`` of ``delta`` by randomized SVD (deterministic in ``seed``)."""
    q = min(rank + oversample, min(delta.shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(delta.double(), q=q, niter=niter)
    return U[:, :rank].to(delta.dtype), S[:rank].to(delta.dtype), V[:, :rank].to(delta.dtype)


def init_from_gradient(G: Tensor, rank: int, scale: float, lr: float,
                       seed: int = 0) -> tuple[Factors, Tensor]:
    """``((A, B), R_0)`` for one layer from the aggregated gradient ``G``."""
    if rank > min(G.shape):
        raise ValueError(f"Fed-SB rank {rank} exceeds the layer's size {tuple(G.shape)}")
    U, S, V = low_rank_factors(-lr * torch.sign(G), rank, seed=seed)
    return (V.T.contiguous(), U.contiguous()), torch.diag(S) / scale


INIT_PHASES = {"sketch": 2, "dense": 1, "seed": 0}
"""Initialisation -> client phases before round 1."""


def sketch_matrix(seed: int, layer: int, d_in: int, width: int) -> Tensor:
    """The seeded Gaussian ``Ω`` (``d_in × width``) of layer number ``layer``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(d_in, width, generator=gen)


def weighted_sum(uploads: Sequence[ClientUpload], layer: str) -> Tensor:
    """``Σ p_k grads_k[layer]``."""
    p = client_weights(uploads)
    return sum(w * u.grads[layer] for w, u in zip(p, uploads, strict=True))


def init_from_sketch(Q: Tensor, Z: Tensor, rank: int, scale: float,
                     lr: float) -> tuple[Factors, Tensor]:
    """``((A, B), R_0)`` for one layer from ``Q`` (``d_out × w``) and ``Z̄ = Qᵀ Ḡ`` (``w × d_in``):
    the top ``rank`` directions of ``−c Ḡ ≈ −c Q Z̄`` (see the module docstring)."""
    d_out, d_in = Q.shape[0], Z.shape[1]
    Ut, S, Vh = torch.linalg.svd(Z.double(), full_matrices=False)   # (w, w), (w,), (w, d_in)
    U = Q.double() @ Ut                                              # (d_out, w)
    norm = float(torch.linalg.vector_norm(Z))
    c = lr * (d_out * d_in) ** 0.5 / norm if norm > 0 else 0.0
    B, A, R = U[:, :rank], Vh[:rank], -c * torch.diag(S[:rank]) / scale
    return (A.to(Z.dtype).contiguous(), B.to(Z.dtype).contiguous()), R.to(Z.dtype)


def orthonormal(gen: torch.Generator, rows: int, cols: int) -> Tensor:
    """A ``rows × cols`` (rows ≥ cols) matrix with orthonormal columns, drawn from ``gen``."""
    Q, R = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).float()


@register_strategy
class FedSB(Strategy):
    name = "fed-sb"
    adapter_plan = AdapterPlan(factors=("A", "B", "R"), train=("R",), upload=("R",), download=("R",),
                               shared=("A", "B"))
    uploads = ("init: Y_k = G_k Ω (d_out × w), then Z_k = Qᵀ G_k (w × d_in) per layer (init=dense:"
               " G_k, d_out × d_in; init=seed or --init-data: nothing); then R_k (r × r) per layer,"
               " plus the head")
    downloads = ("init: Ω (d_in × w), then Q (d_out × w) per layer; the shared frozen A, B and R_0;"
                 " then the averaged R, plus the head")
    sum_only = True
    heterogeneous_ranks = False
    default_lr = 1e-2  # only the r×r cores train: a larger step than LoRA's A and B
    dp_lr = 3e-2  # chosen on validation at ε = 8 with a public warm start (RESULTS.md, session 24)
    options = {"init_lr": Option(float, 1e-3, "η of the approximated first step"),
               "init": Option(str, "sketch", "sketch, dense (the d_out × d_in gradient) or seed (no"
                              " data)"),
               "sketch_width": Option(int, 0, "w, columns of the sketch (0: twice the rank)")}
    takes_seed = True

    def __init__(self, init_lr: float = 1e-3, init: str = "sketch", sketch_width: int = 0,
                 seed: int = 0, public: bool = False) -> None:
        if not 0 < init_lr < math.inf:  # nan or inf would make the initial state nan
            raise ValueError(f"Fed-SB init_lr must be finite and > 0, got {init_lr}")
        if init not in INIT_PHASES:
            raise ValueError(f"Fed-SB init={init!r}: use one of {', '.join(INIT_PHASES)}")
        if sketch_width < 0:
            raise ValueError(f"Fed-SB sketch_width must be ≥ 0, got {sketch_width}")
        if public and init == "seed":
            raise ValueError("init=seed reads no data: drop --init-data, or use init=sketch")
        self.init_lr, self.init, self.sketch_width, self.seed = init_lr, init, sketch_width, seed
        self.init_phases, self.public_init = INIT_PHASES[init], public

    @classmethod
    def from_job(cls, job) -> FedSB:
        """With the job's ``--init-data`` (a public initialisation) and a check of ``w ≥ r``."""
        strategy = super().from_job(job)
        rank = int(getattr(job, "rank", 0))
        if strategy.init == "sketch" and 0 < strategy.sketch_width < rank:
            raise ValueError(f"sketch_width={strategy.sketch_width} is below the rank {rank}: the"
                             f" sketch must hold r directions; pass sketch_width ≥ {rank} (or 0 for"
                             f" {2 * rank})")
        if getattr(job, "init_data", None):  # the constructor checks that the init reads data
            return cls(strategy.init_lr, strategy.init, strategy.sketch_width, strategy.seed, public=True)
        return strategy

    def width(self, rank: int, shape: tuple[int, int]) -> int:
        """The sketch's columns ``w`` (at most the layer's smaller side)."""
        return min(self.sketch_width or 2 * rank, *shape)

    def init_probes(self, phase: int, shapes: dict[str, tuple[int, int]], rank: int,
                    carry: dict) -> dict[str, Probe]:
        if self.init == "dense":
            return {layer: Probe() for layer in shapes}
        if phase == 0:
            if min(self.width(rank, shape) for shape in shapes.values()) < rank:
                raise ValueError(f"Fed-SB's sketch_width={self.sketch_width} is below the rank {rank}")
            return {layer: Probe(right=sketch_matrix(self.seed, i, shape[1], self.width(rank, shape)))
                    for i, (layer, shape) in enumerate(shapes.items())}
        # in the model's layer order (not the uploads' order, which a coded upload sorts by name),
        # so that the message and its bytes are the same in every engine
        return {layer: Probe(left=carry["Q"][layer]) for layer in shapes}

    def init_reduce(self, phase: int, uploads: Sequence[ClientUpload], carry: dict) -> dict:
        client_weights(uploads)  # refuses an empty phase
        layers = list(uploads[0].grads)
        if self.init == "dense":
            return {**carry, "G": {layer: weighted_sum(uploads, layer) for layer in layers}}
        if phase == 0:  # Q: an orthonormal basis of the range of Σ p_k G_k Ω
            return {**carry, "Q": {layer: torch.linalg.qr(weighted_sum(uploads, layer))[0]
                                   for layer in layers}}
        return {**carry, "Z": {layer: weighted_sum(uploads, layer) for layer in layers}}

    def initialize(self, carry: dict, rank: int, scale: float,
                   shapes: dict[str, tuple[int, int]]) -> GlobalState:
        factors, cores = {}, {}
        for i, (layer, (d_out, d_in)) in enumerate(shapes.items()):
            if rank > min(d_out, d_in):
                raise ValueError(f"Fed-SB rank {rank} exceeds the layer's size {(d_out, d_in)}")
            if self.init == "seed":
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
                factors[layer] = (orthonormal(gen, d_in, rank).T.contiguous(), orthonormal(gen, d_out, rank))
                cores[layer] = torch.zeros(rank, rank)
            elif self.init == "dense":
                factors[layer], cores[layer] = init_from_gradient(carry["G"][layer], rank, scale,
                                                                  self.init_lr, seed=self.seed + i)
            else:
                factors[layer], cores[layer] = init_from_sketch(carry["Q"][layer], carry["Z"][layer],
                                                                rank, scale, self.init_lr)
        return GlobalState(factors=factors, scale=scale, cores=cores)

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        if state.factors is None or state.cores is None:
            raise ValueError("fed-sb needs its initialisation before aggregating R")
        p = client_weights(uploads)
        cores, parts = {}, {}
        for layer in uploads[0].cores:
            R = sum(w * u.cores[layer] for w, u in zip(p, uploads, strict=True))
            cores[layer] = R
            A, B = state.factors[layer]
            parts[layer] = ([state.scale * B @ R], [A],
                            *ideal_factors(uploads, p, layer, shared=(A, B), shared_scale=state.scale))
        new = GlobalState(factors=state.factors, scale=state.scale, cores=cores,
                          merged=dict(state.merged), head=average_head(uploads, p))
        return Aggregate(state=new, fold={}, agg_error=relative_error(parts))


def initialize_from_gradients(strategy: Strategy, gradients: Sequence[ClientUpload], rank: int,
                              scale: float) -> GlobalState | None:
    """Run ``strategy``'s initialisation phases against clients whose dense gradients ``G_k`` are
    known (``gradients[k].grads``): each answers a probe with ``Lᵀ G_k R``. For tests and
    benchmarks of the server side, without a model."""
    shapes = {layer: tuple(G.shape) for layer, G in gradients[0].grads.items()} if gradients else {}
    carry: dict = {}
    for phase in range(strategy.init_phases):
        probes = strategy.init_probes(phase, shapes, rank, carry)
        uploads = [ClientUpload(num_examples=u.num_examples,
                                grads={layer: _apply(probes[layer], G) for layer, G in u.grads.items()})
                   for u in gradients]
        carry = strategy.init_reduce(phase, uploads, carry)
    return strategy.initialize(carry, rank, scale, shapes)


def _apply(probe: Probe, G: Tensor) -> Tensor:
    """``Lᵀ G R`` of a dense ``G``."""
    out = G if probe.left is None else probe.left.to(G.dtype).T @ G
    return out if probe.right is None else out @ probe.right.to(G.dtype)
