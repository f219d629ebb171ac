"""The slow, obvious dense reference the strategy tests compare against, and their clients.

Every update is built as an explicit ``d_out × d_in`` matrix in float64:
``ΔW_k = s_k B_k A_k``, ``ΔW* = Σ p_k ΔW_k`` with ``p_k = n_k / Σ n``, and the
relative error ``sqrt(Σ_l ‖agg_l − ΔW*_l‖²) / sqrt(Σ_l ‖ΔW*_l‖²)`` with
``torch.linalg.norm``. The strategies themselves never form such a matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.strategies import ClientUpload, GlobalState
from fedlora.strategies.fed_sb import FedSB, initialize_from_gradients

D_IN, D_OUT = 16, 12
LAYERS = {"q": (D_OUT, D_IN), "v": (D_IN, 10)}   # layer -> (d_out, d_in)
F64 = torch.float64


def weights(uploads: Sequence[ClientUpload]) -> list[float]:
    total = sum(u.num_examples for u in uploads)
    return [u.num_examples / total for u in uploads]


def dense(A: torch.Tensor, B: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    return s * B.double() @ A.double()


def dense_ideal(uploads: Sequence[ClientUpload], layer: str, uniform: bool = False) -> torch.Tensor:
    """``Σ p_k s_k B_k A_k`` as a dense float64 matrix (``p_k = 1/K`` if ``uniform``)."""
    p = [1.0 / len(uploads)] * len(uploads) if uniform else weights(uploads)
    return sum(pk * dense(*u.factors[layer], u.scale) for pk, u in zip(p, uploads, strict=True))


def dense_ideal_sb(uploads: Sequence[ClientUpload], state: GlobalState, layer: str) -> torch.Tensor:
    """``Σ p_k s B R_k A`` for LoRA-SB clients sharing ``state``'s A, B and scale."""
    A, B = state.factors[layer]
    return sum(pk * state.scale * B.double() @ u.cores[layer].double() @ A.double()
               for pk, u in zip(weights(uploads), uploads, strict=True))


def dense_rel_error(agg: dict[str, torch.Tensor], ideal: dict[str, torch.Tensor]) -> float:
    num = sum(torch.linalg.norm(agg[k].double() - ideal[k].double()) ** 2 for k in ideal)
    den = sum(torch.linalg.norm(ideal[k].double()) ** 2 for k in ideal)
    return float((num / den) ** 0.5)


def global_dense(state: GlobalState, layer: str) -> torch.Tensor:
    """The global live adapter's dense update ``s B A`` (or ``s B R A``)."""
    A, B = state.factors[layer]
    if state.cores is not None:
        return state.scale * B.double() @ state.cores[layer].double() @ A.double()
    return dense(A, B, state.scale)


def make_client(gen: torch.Generator, n: int, rank: int, alpha: float = 16.0,
                layers: dict[str, tuple[int, int]] | None = None, dtype=F64,
                head: bool = False) -> ClientUpload:
    layers = layers or {"q": (D_OUT, D_IN)}
    factors = {
        name: (torch.randn(rank, d_in, generator=gen, dtype=dtype),
               torch.randn(d_out, rank, generator=gen, dtype=dtype))
        for name, (d_out, d_in) in layers.items()
    }
    heads = {"w": torch.randn(3, 4, generator=gen, dtype=dtype),
             "b": torch.randn(3, generator=gen, dtype=dtype)} if head else {}
    return ClientUpload(num_examples=n, factors=factors, scale=alpha / rank, head=heads)


def hetero_clients(seed: int = 0, dtype=F64, layers=None) -> list[ClientUpload]:
    gen = torch.Generator().manual_seed(seed)
    return [make_client(gen, n, r, alpha=a, layers=layers, dtype=dtype)
            for n, r, a in [(10, 2, 4.0), (30, 4, 16.0), (60, 8, 8.0)]]


def same_rank_clients(seed: int = 0, n=(10, 30, 60), rank: int = 4, layers=None,
                      head: bool = False) -> list[ClientUpload]:
    gen = torch.Generator().manual_seed(seed)
    return [make_client(gen, nk, rank, alpha=8.0, layers=layers, head=head) for nk in n]


def sb_setup(seed: int = 0, n=(5, 15, 30), rank: int = 3, scale: float = 2.0):
    """An initialised Fed-SB state and clients uploading random cores."""
    gen = torch.Generator().manual_seed(seed)
    layers = {"q": (10, 12), "v": (12, 8)}
    strat = FedSB(init_lr=1e-3, init="dense", seed=7)
    grads = [ClientUpload(num_examples=nk,
                          grads={k: torch.randn(*shape, generator=gen, dtype=F64)
                                 for k, shape in layers.items()}) for nk in n]
    state = initialize_from_gradients(strat, grads, rank=rank, scale=scale)
    clients = [ClientUpload(num_examples=nk, scale=scale,
                            cores={k: torch.randn(rank, rank, generator=gen, dtype=F64)
                                   for k in layers}) for nk in n]
    return strat, grads, state, clients


def ridge_reference(uploads, layer: str, lam: float) -> torch.Tensor:
    """ΔB of ``min ‖ΔW* − s(B̄+ΔB)Ā‖² + λ‖ΔB‖²`` as a dense least-squares problem on
    ``vec(ΔB)``: ``vec(ΔB Ā) = (Āᵀ ⊗ I) vec(ΔB)`` (column-major vec)."""
    p = weights(uploads)
    s = uploads[0].scale
    A_bar = sum(pk * u.factors[layer][0].double() for pk, u in zip(p, uploads, strict=True))
    B_bar = sum(pk * u.factors[layer][1].double() for pk, u in zip(p, uploads, strict=True))
    target = dense_ideal(uploads, layer) - s * B_bar @ A_bar           # (d_out, d_in)
    d_out, r = B_bar.shape
    M = s * torch.kron(A_bar.T.contiguous(), torch.eye(d_out, dtype=F64))             # (d_out d_in, d_out r)
    M = torch.cat([M, lam ** 0.5 * torch.eye(d_out * r, dtype=F64)])
    y = torch.cat([target.T.reshape(-1), torch.zeros(d_out * r, dtype=F64)])
    vec = torch.linalg.lstsq(M, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return vec.reshape(r, d_out).T
