"""LoRA layers that hold K clients at once: the one place for adapter math.

A frozen linear layer ``y = x W0ᵀ + b`` (W0: ``d_out × d_in``) gets, for client k,

    y = x W0ᵀ + b + s_k · x A_kᵀ B_kᵀ,        s_k = α / r_k

with ``A_k`` (``r_k × d_in``) and ``B_k`` (``d_out × r_k``), so the client's update
of the weight is ``ΔW_k = s_k B_k A_k``. The K clients are stored stacked with a
leading client dimension: ``A`` is ``(K, r_max, d_in)`` and ``B`` is
``(K, d_out, r_max)``. A client of rank ``r_k < r_max`` uses only the first ``r_k``
rows of ``A_k`` and columns of ``B_k``; the rest is multiplied by a 0/1 rank mask
in the forward pass, so those entries get exactly zero gradient and, starting at
zero, stay exactly zero under SGD or AdamW (weight decay of zero is zero).

**LoRA-SB form** (Fed-SB): ``ΔW_k = s · B R_k A`` with ``A`` (``r × d_in``) and
``B`` (``d_out × r``) frozen and shared by every client, and only ``R_k``
(``r × r``) trained.

Each batch row is tagged with its client slot through a shared :class:`Router`;
the frozen ``x W0ᵀ`` is one GEMM over the whole batch and the per-client terms are
batched matmuls (see ``fedlora.kernels``), never a loop over clients.

Task heads (e.g. a classifier) are trained in full per client:
:class:`~fedlora.models.head.BatchedLinear` holds ``(K, d_out, d_in)`` weights. Nothing here merges
weights as a side effect; folding an update into the base is an explicit call.

**Quantized bases** (``--quantize``: bitsandbytes' ``Linear4bit``, ``Linear8bitLt``): the
packed weight's shape is not ``(d_out, d_in)`` (:func:`linear_shape` reads
``in_features``/``out_features``), the forward goes through the base module, and a fold is
never requantized: it is kept as a frozen low-rank residual ``U V`` beside the base,

    y = base(x) + x Vᵀ Uᵀ + s_k · x A_kᵀ B_kᵀ,

``U`` (``d_out × R``) and ``V`` (``R × d_in``) in the adapter dtype, re-factored exactly at
every fold (:func:`compact_residual`), so ``R`` never exceeds ``min(d_out, d_in)``. With a
``fold_rank`` N (``--fold-rank``) each fold keeps only the residual's top N singular directions:
not exact any more, and the run reports what that costs (``fold_truncation_error``).

**Dropout** (``--lora-dropout P``, PEFT's ``lora_dropout``): in training the adapter term reads a
dropped-out input, ``s_k · dropout_P(x) A_kᵀ B_kᵀ`` (LoRA-SB: ``s · dropout_P(x) Aᵀ R_kᵀ Bᵀ``), while
the base, the residual and any correction read ``x``. Kept entries are scaled by ``1 / (1 − P)``. The
mask is a hash of each row's key (its client's sampler seed, round, step and place in the step,
set on the :class:`Router` by the training step) with the layer, token and feature
(``fedlora.kernels.dropout``), so it is the same whichever clients share the pass, in whichever
order and micro-batches; without keys (evaluation, generation) there is no dropout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from fedlora.errors import UserError
from fedlora.kernels import Routing, lora_delta, lora_dropout, sb_delta
from fedlora.strategies.factors import factored_svd

#: Singular values of a folded residual ``U V`` at or below this share of ``‖U‖_F ‖V‖_F`` (the
#: scale of the float64 rounding of its terms) are exact zeros: cancellations, or directions
#: beyond ``min(d_out, d_in)``. Compaction drops them, and nothing else.
RESIDUAL_RTOL = 1e-12


class Router:
    """Shared holder of the current batch's :class:`Routing` (one per model).

    ``rows`` is the batch's row count, recorded by every forward of the model (it outlives the
    forward, for the backward hooks). A model that flattens its tokens before a layer (OPT's MLP:
    ``(N, T, d) -> (N·T, d)``, row-major) hands that layer ``N·T`` rows; the layer views them as
    ``(N, T, d)`` (:meth:`as_rows`), so each batch row's tokens go to that row's slot. ``keys``:
    each row's ``(N,)`` dropout key in a training pass (None: no dropout); like ``rows``, it outlives
    the forward, for the backward hooks (Opacus' per-example gradients), until the next forward.
    """

    def __init__(self) -> None:
        self.routing: Routing | None = None
        self.rows: int | None = None
        self.keys: Tensor | None = None

    def get(self, x: Tensor) -> Routing:
        """The routing of a layer's input ``x`` (``(N, ..., d)``, as :meth:`as_rows` gives it), or
        every row on slot 0 when none is set."""
        n_rows = x.shape[0]
        if self.routing is None:   # built directly: no host sync per layer call
            return Routing(ids=torch.zeros(n_rows, dtype=torch.long, device=x.device),
                           slots=torch.zeros(1, dtype=torch.long, device=x.device), in_order=True)
        n = self.routing.ids.numel()
        if n_rows != n:
            raise UserError(
                f"an adapted layer got an input of shape {tuple(x.shape)} for a batch of {n} rows: the model"
                " moves its tokens before it (sequence first, like Longformer's attention, or to a"
                " mixture-of-experts expert); leave that layer out of --target-modules")
        return self.routing

    def batch_rows(self, x: Tensor) -> int:
        """The batch rows that a layer's input ``x`` holds: ``N`` for ``(N, ..., d)`` or a flattened
        ``(N·T, d)`` (``x.shape[0]`` when the batch is unknown)."""
        n = self.routing.ids.numel() if self.routing is not None else self.rows
        flat = n and x.dim() == 2 and x.shape[0] != n and x.shape[0] % n == 0
        return n if flat else x.shape[0]

    def as_rows(self, x: Tensor) -> Tensor:
        """``x`` with the batch rows first: a flattened ``(N·T, d)`` input as ``(N, T, d)`` (a view where
        it can be)."""
        n = self.batch_rows(x)
        return x if n == x.shape[0] else x.reshape(n, -1, x.shape[-1])


def kaiming_rows(gen: torch.Generator, rows: int, d_in: int) -> Tensor:
    """PEFT's default LoRA A init: kaiming-uniform with a=√5, i.e. U(-1/√d_in, 1/√d_in).

    Drawn row by row, so the first r rows do not depend on how many rows are drawn
    (a rank-r client gets the same A whether padded to a larger rank or not).
    """
    bound = 1.0 / math.sqrt(d_in)
    return torch.stack([(torch.rand(d_in, generator=gen) * 2 - 1) * bound for _ in range(rows)])


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters, heads and their optimizer stay fp32 over a bf16/fp16 base (fp64 stays fp64)."""
    return torch.float64 if base_dtype == torch.float64 else torch.float32


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes quantized linear layer (``Linear4bit``, ``Linear8bitLt``)."""
    return type(module).__module__.split(".")[0] == "bitsandbytes"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear layer, quantized or not, or of a :class:`BatchedLoRALinear`'s base."""
    base = module.base if isinstance(module, BatchedLoRALinear) else module
    return int(base.out_features), int(base.in_features)


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: its weight's, or a quantized layer's compute dtype (fp32 if unset)."""
    if is_quantized(base):
        return getattr(base, "compute_dtype", None) or torch.float32
    return base.weight.dtype


@torch.no_grad()
def compact_residual(U: Tensor, V: Tensor, max_rank: int = 0) -> tuple[Tensor, Tensor]:
    """Re-factor ``U V`` (``U``: ``d_out × R``, ``V``: ``R × d_in``) to its numerical rank, exactly,
    or to its best approximation of rank ``max_rank`` (0: no bound).

    QR of ``U`` and ``Vᵀ``, then the SVD of the small core (float64, never a ``d × d`` SVD);
    singular values at or below ``RESIDUAL_RTOL · ‖U‖_F ‖V‖_F`` (rounding) are dropped, so the
    result is exact to float precision; with ``max_rank`` only the largest ``max_rank`` are kept
    (the discarded part's Frobenius norm is that of the singular values dropped: Eckart–Young).
    Returns ``(U' Σ, V')`` with orthonormal rows of ``V'`` and at most ``min(d_out, d_in, R)``
    columns, largest singular value first, in the input dtype.
    """
    if U.shape[1] == 0:
        return U, V
    Us, S, Vs = factored_svd(V, U)                             # U V = Us diag(S) Vsᵀ
    tol = RESIDUAL_RTOL * float(U.double().norm() * V.double().norm())
    n = int((S > tol).sum())
    if max_rank:
        n = min(n, max_rank)
    return (Us[:, :n] * S[:n]).to(U.dtype).contiguous(), Vs[:, :n].T.contiguous().to(V.dtype)


class BatchedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus K per-client LoRA adapters (or LoRA-SB cores).

    Parameters
    ----------
    base : nn.Linear
        The frozen layer (kept, not copied); may be a bitsandbytes ``Linear4bit`` /
        ``Linear8bitLt`` (then folds go to a residual, see the module docstring).
    ranks : list of int
        Rank of each of the K client slots.
    alpha : float
        LoRA α; slot k uses ``s_k = α / r_k``. In the LoRA-SB form the scale is
        ``α / r`` for every slot.
    router : Router
        Shared routing of batch rows to slots.
    core : bool
        The LoRA-SB form (an adapter plan whose factors include ``R``): per-slot cores
        ``R_k`` between one shared, frozen ``A`` and ``B``. Otherwise per-slot ``A_k``,
        ``B_k``; which of them train is set by :meth:`set_trainable`.
    fold_rank : int
        A quantized base: the most directions the folded residual keeps (``--fold-rank``;
        0: all of them, exactly).
    dropout, layer_id : float, int
        The adapter input's dropout probability (``--lora-dropout``) and the layer's number in its
        model, which the dropout mask hashes.
    """

    def __init__(self, base: nn.Linear, ranks: list[int], alpha: float, router: Router,
                 core: bool = False, fold_rank: int = 0, dropout: float = 0.0, layer_id: int = 0) -> None:
        super().__init__()
        self.dropout, self.layer_id = float(dropout), int(layer_id)
        if core and len(set(ranks)) != 1:
            raise ValueError("LoRA-SB needs the same rank for every client")
        self.base = base
        self.core = core
        self.router = router
        self.ranks = list(ranks)
        K, r_max = len(ranks), max(ranks)
        d_out, d_in = linear_shape(base)
        dev, dt = base.weight.device, adapter_dtype(compute_dtype(base))
        self.quantized = is_quantized(base)
        self.fold_rank = fold_rank
        if self.quantized:  # folds, never requantized: y += x Vᵀ Uᵀ (rank grows, compacted exactly)
            self.register_buffer("fold_U", torch.zeros(d_out, 0, device=dev, dtype=dt), persistent=False)
            self.register_buffer("fold_V", torch.zeros(0, d_in, device=dev, dtype=dt), persistent=False)
        self.register_buffer("scale", torch.tensor([alpha / r for r in ranks], device=dev, dtype=dt))
        mask = torch.zeros(K, r_max, device=dev, dtype=dt)
        for k, r in enumerate(ranks):
            mask[k, :r] = 1
        self.register_buffer("rank_mask", mask)
        self.heterogeneous = len(set(ranks)) > 1
        self.called = self.weight_read = False   # for check_bypassed
        if not core:
            self.lora_A = nn.Parameter(torch.zeros(K, r_max, d_in, device=dev, dtype=dt))
            self.lora_B = nn.Parameter(torch.zeros(K, d_out, r_max, device=dev, dtype=dt))
        else:
            self.register_buffer("sb_A", torch.zeros(r_max, d_in, device=dev, dtype=dt))
            self.register_buffer("sb_B", torch.zeros(d_out, r_max, device=dev, dtype=dt))
            self.lora_R = nn.Parameter(torch.zeros(K, r_max, r_max, device=dev, dtype=dt))

    @property
    def num_clients(self) -> int:
        return len(self.ranks)

    @property
    def weight(self) -> Tensor:
        """The frozen base layer's weight, as PEFT's LoRA layers expose it: models read it beside the
        call (T5's MLP casts its input to ``wo.weight``'s dtype); one that reads it in place of the call
        (Mamba's ``dt_proj``) computes past the adapter (refused: ``model.check_bypassed``)."""
        self.weight_read = True
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def factor(self, name: str) -> nn.Parameter:
        """The stacked per-slot tensor of factor ``name`` (``A``, ``B`` or, LoRA-SB, ``R``)."""
        if self.core and name in ("A", "B"):
            raise ValueError(f"LoRA-SB's {name} is shared and frozen, not a per-slot factor")
        return {"A": self.lora_A, "B": self.lora_B}[name] if not self.core else self.lora_R

    def set_trainable(self, train: tuple[str, ...]) -> None:
        """Let only the factors in ``train`` require gradients (the plan's ``train``)."""
        names = ("R",) if self.core else ("A", "B")
        for name in names:
            self.factor(name).requires_grad_(name in train)

    # ----------------------------------------------------------------- forward
    def dropped(self, x: Tensor) -> Tensor:
        """What the adapter term reads of ``x`` (``(N, T, d_in)`` rows): ``x`` itself, or, in a training
        pass with ``--lora-dropout``, its dropout in the adapter dtype (the same bits in the forward
        and in the per-example gradients)."""
        keys = self.router.keys
        if not self.dropout or keys is None:
            return x
        return lora_dropout(x.to(self.scale.dtype), keys, self.layer_id, self.dropout)

    def forward(self, x: Tensor) -> Tensor:
        self.called = True
        corrected = getattr(self.base, "frozen_term", None)      # a quantized base with its correction
        y = (self.base.base if corrected else self.base)(x)       # (N, T, d_out), shared GEMM
        if not isinstance(y, Tensor):
            raise UserError(f"an adapted {type(self.base).__name__} returns a {type(y).__name__}, not a"
                            " linear layer's output: leave it out of --target-modules")
        xa = self.router.as_rows(x).to(self.scale.dtype)          # (N, T, d_in), also when flattened
        routing = self.router.get(xa)
        frozen = corrected(xa) if corrected else None             # frozen terms in the adapter dtype
        if self.quantized and self.fold_U.shape[1]:
            fold = (xa @ self.fold_V.T) @ self.fold_U.T
            frozen = fold if frozen is None else frozen + fold
        xd = self.dropped(xa)                                     # the adapter's input
        if not self.core:
            A, B = self.lora_A, self.lora_B
            if self.heterogeneous:
                A = A * self.rank_mask.unsqueeze(-1)              # (K, r_max, d_in)
                B = B * self.rank_mask.unsqueeze(1)               # (K, d_out, r_max)
            delta = lora_delta(xd, A, B, self.scale, routing)
        else:
            delta = sb_delta(xd, self.sb_A, self.sb_B, self.lora_R, self.scale[0], routing)
        if frozen is not None:  # one rounding of every adapter-dtype term, as PEFT's one LoRA pair
            delta = delta.reshape(frozen.shape) + frozen
        return y + delta.reshape(y.shape).to(y.dtype)

    # ------------------------------------------------------------- slot access
    @torch.no_grad()
    def reset_slots(self, gen: torch.Generator) -> None:
        """Fresh LoRA: one ``A`` drawn from ``gen`` for all slots (masked to r_k), ``B = 0``."""
        if self.core:
            raise RuntimeError("reset_slots is for the LoRA form; LoRA-SB uses set_shared")
        A = kaiming_rows(gen, self.lora_A.shape[1], self.lora_A.shape[2])
        self.lora_A.copy_(A.to(self.lora_A).unsqueeze(0) * self.rank_mask.unsqueeze(-1))
        self.lora_B.zero_()

    def get_slot(self, k: int) -> tuple[Tensor, Tensor]:
        """Client k's ``(A_k (r_k, d_in), B_k (d_out, r_k))``, detached copies."""
        r = self.ranks[k]
        return (self.lora_A[k, :r].detach().clone(), self.lora_B[k, :, :r].detach().clone())

    @torch.no_grad()
    def set_slot(self, k: int, A: Tensor, B: Tensor) -> None:
        """Load ``A`` (r_k, d_in) and ``B`` (d_out, r_k) into slot k, zero-padded."""
        r = self.ranks[k]
        if tuple(A.shape) != (r, self.lora_A.shape[2]) or tuple(B.shape) != (self.lora_B.shape[1], r):
            raise ValueError(
                f"slot {k} expects A {(r, self.lora_A.shape[2])} and B {(self.lora_B.shape[1], r)},"
                f" got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        self.lora_A[k].zero_()
        self.lora_B[k].zero_()
        self.lora_A[k, :r] = A.to(self.lora_A)
        self.lora_B[k, :, :r] = B.to(self.lora_B)

    @torch.no_grad()
    def set_ranks(self, ranks: list[int], alpha: float) -> None:
        """Give the K slots new ranks (≤ the r_max this layer was built with): the
        simulator reuses slots for the clients of each pass."""
        r_max = self.rank_mask.shape[1]
        if len(ranks) != self.num_clients or max(ranks) > r_max or min(ranks) < 1:
            raise ValueError(f"need {self.num_clients} ranks in 1..{r_max}, got {ranks}")
        if self.core and len(set(ranks)) != 1:
            raise ValueError("LoRA-SB needs the same rank for every client")
        self.ranks = list(ranks)
        if not self.core:
            self.scale.copy_(torch.tensor([alpha / r for r in ranks]))
        self.rank_mask.zero_()
        for k, r in enumerate(ranks):
            self.rank_mask[k, :r] = 1
        self.heterogeneous = len(set(ranks)) > 1

    def get_core(self, k: int) -> Tensor:
        """Client k's LoRA-SB core ``R_k`` (r, r)."""
        return self.lora_R[k].detach().clone()

    @torch.no_grad()
    def set_core(self, k: int, R: Tensor) -> None:
        self.lora_R[k] = R.to(self.lora_R)

    @torch.no_grad()
    def set_shared(self, A: Tensor, B: Tensor, scale: float | None = None) -> None:
        """Set the frozen LoRA-SB factors ``A`` (r, d_in), ``B`` (d_out, r) and the scale."""
        self.sb_A.copy_(A.to(self.sb_A))
        self.sb_B.copy_(B.to(self.sb_B))
        if scale is not None:
            self.scale.fill_(scale)

    @torch.no_grad()
    def fold(self, A: Tensor, B: Tensor, exact: bool = False) -> None:
        """Add ``B @ A`` (d_out × d_in) to the frozen base weight, explicitly.

        A quantized base is never requantized: ``B`` and ``A`` join the residual factors
        (``fold_U``, ``fold_V``), which are then re-factored exactly (:func:`compact_residual`),
        or truncated to ``fold_rank`` directions unless ``exact`` (an evaluation's temporary fold).
        """
        if not self.quantized:
            self.base.weight.add_((B.to(torch.float64) @ A.to(torch.float64)).to(self.base.weight))
            return
        U = torch.cat([self.fold_U, B.to(self.fold_U)], dim=1)
        V = torch.cat([self.fold_V, A.to(self.fold_V)], dim=0)
        self.fold_U, self.fold_V = compact_residual(U, V, 0 if exact else self.fold_rank)

    def residual(self) -> tuple[Tensor, Tensor] | None:
        """``(V, U)`` (LoRA's ``(A, B)`` order) of the residual beside a quantized base; None
        over an unquantized one, whose folds are in its weight."""
        return (self.fold_V.clone(), self.fold_U.clone()) if self.quantized else None

    def fold_state(self) -> tuple[Tensor, ...]:
        """A copy of what :meth:`fold` changes (the base weight, or the residual factors)."""
        if self.quantized:
            return (self.fold_U.clone(), self.fold_V.clone())
        return (self.base.weight.detach().clone(),)

    @torch.no_grad()
    def restore_fold_state(self, saved: tuple[Tensor, ...]) -> None:
        """Undo folds since :meth:`fold_state` returned ``saved``, bit for bit."""
        if self.quantized:
            self.fold_U, self.fold_V = saved
        else:
            self.base.weight.copy_(saved[0])


@contextmanager
def adapters_off(layers: Iterable[BatchedLoRALinear]) -> Iterator[None]:
    """Inside the block every slot's adapter term of ``layers`` is off (its scale is 0): the model is
    its frozen base (with any folds), every slot alike; the scales are restored on leaving."""
    saved = [(layer, layer.scale.clone()) for layer in layers]
    try:
        for layer, _ in saved:
            layer.scale.zero_()
        yield
    finally:
        for layer, scale in saved:
            layer.scale.copy_(scale)

