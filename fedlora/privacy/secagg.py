"""What a client hands to secure aggregation, and what the server can expect back (torch only).

With ``--secagg`` the server learns only the *weighted mean* of the round's client updates, never
one client's: each client masks its quantized update with Flower's SecAgg+ protocol
(``flwr.client.mod.secaggplus_mod``; the bridge is ``fedlora.server.secagg``), and the masks cancel
in the sum. Only sum-only strategies can run this way (their aggregate is a weighted mean of the
uploaded tensors, see the strategy table).

What a client sends, for every tensor ``θ`` its plan uploads (and the head)::

    Δ_k = θ_k − θ̄                    the update from the global tensors it started from
    Δ_k ← clip(Δ_k)                   coordinates to [−R, R]; with --dp client, L2 norm to C (= R)
    w_k = min(n_k, W)                 its weight (1 with --weighting uniform or --dp client)

and SecAgg+ quantizes ``(w_k / W) Δ_k`` to integers in ``[0, T]`` by stochastic rounding over
``[−R, R]``, adds pairwise and private masks mod ``2³²``, and returns to the server
``Σ_k w_k Δ_k / Σ_k w_k`` (the weights travel masked beside the vector).

**The quantization range is fixed by the clip, not guessed.** ``R`` is ``--secagg-range``; by
default the DP clip ``--update-clip`` under ``--dp client`` (a clipped update has no coordinate
above its L2 norm, so nothing more is cut), else :data:`DEFAULT_RANGE`. ``W`` is ``--max-examples``
or :data:`DEFAULT_MAX_WEIGHT`. ``T = 2^(32 − ⌈log₂(K + 1)⌉)`` for ``K`` sampled clients, the largest
power of two whose ``K``-fold sum (plus the summed weights) cannot wrap around ``2³²``.

**Error.** Stochastic rounding is unbiased, and each client's value moves by at most one step
``2R / T``; the mean divides the summed errors by ``Σ w_k / W``, so every coordinate of the
aggregate is within :func:`error_bound` ``= 2 R K W / (T Σ_k w_k)`` of the exact weighted mean
of the clipped updates (about ``2R/T · W/n̄``; ``R = 1``, ``K = 10``, ``W = 10⁴`` and 100 examples
per client give 7.5e-7).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MODULUS = 2 ** 32
"""SecAgg+'s mask modulus (Flower's largest)."""

DEFAULT_RANGE = 1.0
"""``R`` without ``--dp client`` and ``--secagg-range``: coordinates of an update beyond ±1 are cut
(a LoRA update of a round moves a coordinate by about lr × steps; clients report the cut share)."""

DEFAULT_MAX_WEIGHT = 10_000
"""``W`` without ``--max-examples``: a client claiming more examples weighs this much."""


def value_range(cfg) -> float:
    """``R``: ``--secagg-range``, else ``--update-clip`` under ``--dp client``, else 1."""
    if cfg.secagg_range > 0:
        return float(cfg.secagg_range)
    return float(cfg.update_clip) if cfg.dp == "client" else DEFAULT_RANGE


def max_weight(cfg) -> int:
    """``W``: the weight SecAgg+ scales every client's by (``--max-examples``, else 10⁴)."""
    if cfg.dp == "client" or cfg.weighting == "uniform":
        return 1
    return int(cfg.max_examples or DEFAULT_MAX_WEIGHT)


def client_weight(cfg, num_examples: int) -> int:
    """``w_k``: 1 (uniform weights, client-level DP) or the example count capped at ``W``."""
    return min(max(int(num_examples), 1), max_weight(cfg))


def quantization_range(clients: int) -> int:
    """``T = 2^(32 − ⌈log₂(K + 1)⌉)``: ``K`` clients' values and weights sum below ``2³²``."""
    if clients < 1:
        raise ValueError(f"secure aggregation needs at least one client, got {clients}")
    return 2 ** (32 - math.ceil(math.log2(clients + 1)))


def error_bound(cfg, clients: int, total_weight: float) -> float:
    """Largest deviation of a coordinate of the secure mean from the exact mean (module docstring)."""
    return 2 * value_range(cfg) * clients * max_weight(cfg) / (quantization_range(clients) * total_weight)


def clip_update(delta: dict[str, Tensor], cfg) -> tuple[dict[str, Tensor], float]:
    """``(clipped Δ, share cut)``: the whole update to L2 norm ``C`` under ``--dp client`` (share:
    1 if it was cut), else every coordinate to ``[−R, R]`` (share: of coordinates)."""
    bound = value_range(cfg)
    if cfg.dp == "client":
        norm = float(sum((t.double() ** 2).sum() for t in delta.values()) ** 0.5)
        factor = min(1.0, bound / norm) if norm > 0 else 1.0
        return {k: t * factor for k, t in delta.items()}, float(factor < 1.0)
    total = sum(t.numel() for t in delta.values())
    cut = sum(int((t.abs() > bound).sum()) for t in delta.values())
    return {k: t.clamp(-bound, bound) for k, t in delta.items()}, cut / max(total, 1)


def flatten(delta: dict[str, Tensor]) -> list[Tensor]:
    """The tensors in the order both sides use: sorted by name."""
    return [delta[k] for k in sorted(delta)]


def unflatten(arrays: list[Tensor], names: list[str]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten` for the expected ``names``."""
    if len(arrays) != len(names):
        raise ValueError(f"the secure aggregate has {len(arrays)} tensors, the round expects {len(names)}")
    return {name: torch.as_tensor(a) for name, a in zip(sorted(names), arrays, strict=True)}
