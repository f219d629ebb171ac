"""Check a client's reply before it reaches the aggregate.

A reply is rejected, by name, when a tensor is missing or unexpected, has the wrong
dtype or shape (a rank other than the client's), holds NaN/Inf, or has an absurd
Frobenius norm. The server logs the reason and leaves the reply out; the global
adapter is computed from the accepted replies only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedlora.models.lora import linear_shape
from fedlora.models.model import FederatedModel
from fedlora.models.state import head_of
from fedlora.strategies import AdapterPlan, Probe

#: Default bound on any uploaded tensor's Frobenius norm (``--max-update-norm``).
MAX_UPDATE_NORM = 1e4


class RejectedReply(ValueError):
    """A client reply that cannot be aggregated; the message says why."""


def expected_upload(fm: FederatedModel, rank: int, plan: AdapterPlan, kind: str = "train",
                    probes: dict[str, Probe] | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a valid upload from a rank-``rank`` client under ``plan``.

    ``kind``: ``"train"`` (the plan's ``upload`` factors, plus the head) or ``"init"`` (an
    initialisation phase: ``Lᵀ G R`` per layer, shaped by ``probes``; dense without them).
    """
    out: dict[str, tuple[int, ...]] = {}
    for name, layer in fm.adapters.items():
        d_out, d_in = linear_shape(layer)
        if kind == "init":
            out[f"{name}.grad"] = probes[name].shape(d_out, d_in) if probes else (d_out, d_in)
            continue
        shapes = {"A": (rank, d_in), "B": (d_out, rank), "R": (rank, rank)}
        for factor in plan.upload:
            out[f"{name}.lora_{factor}"] = shapes[factor]
    if kind == "train":
        for key, t in head_of(fm, 0).items():
            out[f"head.{key}"] = tuple(t.shape)
    return out


def request_limit(fm: FederatedModel, cfg, plan: AdapterPlan, client_init: bool) -> int:
    """Largest push a client of this job may make (``server/ingress.py``): 3 × its largest valid
    reply in float32 (a training upload, or with ``client_init`` Fed-SB's dense initialisation
    gradients, which bound its sketches too; SecAgg+'s masked int64 vectors are twice a float32
    upload), plus 1 MiB of framing."""
    rank = max([cfg.rank, *(cfg.ranks or [])])
    kinds = [expected_upload(fm, rank, plan, "train")]
    if client_init:
        kinds.append(expected_upload(fm, rank, plan, "init"))
    largest = max(4 * sum(math.prod(s) for s in shapes.values()) for shapes in kinds)
    return 3 * largest + 2 ** 20


FRAMING = 64 * 1024
"""Bytes a valid reply may carry beyond its float32 payload: ``.npy`` headers and the JSON index."""


def check_record_size(record, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a reply whose arrays hold more bytes than ``expected`` (float32) plus
    :data:`FRAMING` + 1%, before any array is decoded; ``record`` is a Flower ``ArrayRecord``."""
    allowed = 4 * sum(math.prod(shape) for shape in expected.values())
    allowed += FRAMING + allowed // 100
    got = sum(len(array.data) for array in record.values())
    if got > allowed:
        raise RejectedReply(f"reply of {got} bytes is larger than the {allowed} its adapter plan allows:"
                            " refused before decoding")


def check_upload(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]],
                 max_norm: float = MAX_UPDATE_NORM) -> None:
    """Raise :class:`RejectedReply` naming the first problem; return None if valid."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise RejectedReply(f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise RejectedReply(f"unexpected tensor {extra[0]!r}")
    for key, shape in expected.items():
        t = tensors[key]
        if t.dtype != torch.float32:
            raise RejectedReply(f"{key} has dtype {str(t.dtype).replace('torch.', '')}, expected float32")
        if tuple(t.shape) != shape:
            raise RejectedReply(f"{key} has shape {tuple(t.shape)}, expected {shape}"
                                + _rank_hint(key, tuple(t.shape), shape))
        if not bool(torch.isfinite(t).all()):
            raise RejectedReply(f"{key} holds NaN or Inf values")
        norm = float(torch.linalg.vector_norm(t))
        if not math.isfinite(norm) or norm > max_norm:
            raise RejectedReply(f"{key} has norm {norm:.3g}, above the limit {max_norm:.3g}"
                                " (--max-update-norm)")


def _rank_hint(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    if key.endswith(".lora_A") and got[1:] == want[1:]:
        return f" (rank {got[0]} instead of the client's rank {want[0]})"
    if key.endswith(".lora_B") and got[:1] == want[:1] and len(got) == 2:
        return f" (rank {got[1]} instead of the client's rank {want[1]})"
    if key.endswith(".lora_R") and len(got) == 2:
        return f" (rank {got[0]} instead of {want[0]})"
    return ""
