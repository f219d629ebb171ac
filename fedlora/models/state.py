"""Move adapter state between a :class:`FederatedModel`'s slots and strategy payloads.

Also the flat, named tensor form of uploads and downloads (the names are the keys of
Flower ``ArrayRecord``\\ s and of byte accounting):

* ``<layer>.lora_A`` ``(r, d_in)``, ``<layer>.lora_B`` ``(d_out, r)`` — LoRA factors;
* ``<layer>.lora_R`` ``(r, r)`` — LoRA-SB core;

  which of them travel is the strategy's adapter plan (``upload``, ``download``, ``shared``);
* ``<layer>.grad`` ``(d_out, d_in)`` — Fed-SB initialisation gradient estimate;
* ``<layer>.fold_A`` / ``<layer>.fold_B`` — FLoRA stacks to fold into the base;
* ``head.<module>.weight`` / ``head.<module>.bias`` — task head.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from fedlora.models.model import FederatedModel, draw_seed
from fedlora.strategies import AdapterPlan, ClientUpload, GlobalState, Probe
from fedlora.strategies.base import Factors
from fedlora.strategies.factors import truncated_factors


def head_of(fm: FederatedModel, k: int) -> dict[str, Tensor]:
    """Slot k's task-head tensors, named ``<module>.weight`` / ``<module>.bias``."""
    return {f"{name}.{key}": t for name, layer in fm.heads.items()
            for key, t in layer.get_slot(k).items()}


def extract_upload(fm: FederatedModel, k: int, num_examples: int) -> ClientUpload:
    """Client slot k's adapter (or LoRA-SB cores) and head, as its upload.

    A factor the model's plan keeps on the client (FedSA-LoRA's B) is None: it never
    leaves the client (see :func:`extract_kept`). Frozen factors are included (they are
    the global ones); :func:`upload_tensors` sends only the plan's ``upload``.
    """
    plan = fm.config.plan
    head = head_of(fm, k)
    scale = float(next(iter(fm.adapters.values())).scale[k])
    if plan.core:
        cores = {name: layer.get_core(k) for name, layer in fm.adapters.items()}
        return ClientUpload(num_examples=num_examples, cores=cores, scale=scale, head=head)
    factors = {}
    for name, layer in fm.adapters.items():
        A, B = layer.get_slot(k)
        factors[name] = (None if "A" in plan.keep else A, None if "B" in plan.keep else B)
    return ClientUpload(num_examples=num_examples, factors=factors, scale=scale, head=head)


def extract_kept(fm: FederatedModel, k: int) -> dict[str, Tensor]:
    """Slot k's personal factors (the plan's ``keep``), named ``<layer>.lora_<F>``."""
    out: dict[str, Tensor] = {}
    if not fm.config.plan.keep:
        return out
    for name, layer in fm.adapters.items():
        A, B = layer.get_slot(k)
        for kind in fm.config.plan.keep:
            out[f"{name}.lora_{kind}"] = A if kind == "A" else B
    return out


def load_kept(fm: FederatedModel, k: int, kept: dict[str, Tensor]) -> None:
    """Put a client's personal factors (from :func:`extract_kept`) into slot k."""
    if not kept:
        return
    for name, layer in fm.adapters.items():
        A, B = layer.get_slot(k)
        layer.set_slot(k, kept.get(f"{name}.lora_A", A), kept.get(f"{name}.lora_B", B))


def _set_heads(fm: FederatedModel, head: dict[str, Tensor]) -> None:
    for name, layer in fm.heads.items():
        sub = {key: head[f"{name}.{key}"] for key in layer.slot_keys}
        for k in range(fm.num_clients):
            layer.set_slot(k, sub)


def apply_global(fm: FederatedModel, state: GlobalState, fold: dict[str, Factors],
                 fresh_seed: int | None = None) -> None:
    """Load the global state into every slot, after folding ``fold`` into the base.

    With ``state.factors`` None (FLoRA) every slot gets a fresh adapter drawn from
    ``fresh_seed`` (see :func:`fedlora.models.model.draw_seed`).
    """
    for name, (A, B) in fold.items():
        fm.adapters[name].fold(A, B)
    if fm.config.plan.core:
        if state.factors is None or state.cores is None:
            raise ValueError("a LoRA-SB model needs the shared factors and cores")
        for name, layer in fm.adapters.items():
            layer.set_shared(*state.factors[name], scale=state.scale)
            for k in range(fm.num_clients):
                layer.set_core(k, state.cores[name])
    elif state.factors is None:
        if fresh_seed is None:
            raise ValueError("fresh adapters need a seed")
        fm.reset_adapters(fresh_seed)
    else:
        for name, layer in fm.adapters.items():
            _load_factors(layer, *state.factors[name], state.scale)
    if state.head:
        _set_heads(fm, state.head)


def held_residual(fm: FederatedModel) -> dict[str, Factors]:
    """Layer -> ``(A_r, B_r)``: the residual each layer over a quantized base holds beside it
    (its folds, truncated under ``--fold-rank``); an empty residual or an unquantized layer is left out."""
    out = {}
    for name, layer in fm.adapters.items():
        got = layer.residual()
        if got is not None and got[0].shape[0]:
            out[name] = got
    return out


def _fits(layer, k: int, A: Tensor, scale: float) -> bool:
    """Whether slot k holds factors of ``A``'s rank at ``scale`` (then they load as they are)."""
    return A.shape[0] == layer.ranks[k] and math.isclose(scale, float(layer.scale[k]), rel_tol=1e-6)


def _load_factors(layer, A: Tensor, B: Tensor, scale: float) -> None:
    """Every slot of ``layer`` gets ``scale · B A``: as is, or, where its rank or scale differs
    (FlexLoRA's stacked ΔW*), as the best approximation of its rank (one SVD per rank)."""
    cache: dict[tuple[int, float], tuple[Tensor, Tensor]] = {}
    for k in range(layer.num_clients):
        if _fits(layer, k, A, scale):
            layer.set_slot(k, A, B)
            continue
        key = (layer.ranks[k], float(layer.scale[k]))
        if key not in cache:
            cache[key] = truncated_factors(A, B, scale, *key)[0]
        layer.set_slot(k, *cache[key])


@contextmanager
def exact_global(fm: FederatedModel, state: GlobalState | None) -> Iterator[None]:
    """Slot 0 of ``fm`` as the exact global model while the block runs.

    Where slot 0 holds only an approximation of the global adapter (FlexLoRA: a truncation
    of ΔW* to the slot's rank), the whole ``scale · B A`` is folded into the base (its weight,
    or a quantized base's residual) and slot 0's adapter set to zero; both are restored
    afterwards, bit for bit.
    """
    lossy = (state is not None and state.factors is not None and state.cores is None
             and not fm.config.plan.core
             and any(not _fits(fm.adapters[n], 0, A, state.scale) for n, (A, _) in state.factors.items()))
    if not lossy:
        yield
        return
    saved = {n: (layer.fold_state(), *layer.get_slot(0)) for n, layer in fm.adapters.items()}
    try:
        for name, (A, B) in state.factors.items():
            layer = fm.adapters[name]
            layer.fold(A, state.scale * B, exact=True)
            layer.set_slot(0, torch.zeros_like(saved[name][1]), torch.zeros_like(saved[name][2]))
        yield
    finally:
        with torch.no_grad():
            for name, (folded, A, B) in saved.items():
                fm.adapters[name].restore_fold_state(folded)
                fm.adapters[name].set_slot(0, A, B)


def initial_state(fm: FederatedModel, gen: torch.Generator, fresh: bool) -> GlobalState:
    """The round-0 global state of a LoRA model: A from ``gen``, B = 0, the loaded head.

    ``fresh`` (FLoRA) leaves ``factors`` None: clients draw fresh adapters every round.
    """
    head = head_of(fm, 0)
    if fresh:
        return GlobalState(factors=None, head=head)
    fm.reset_adapters(draw_seed(gen))
    factors = {name: layer.get_slot(0) for name, layer in fm.adapters.items()}
    scale = float(next(iter(fm.adapters.values())).scale[0])
    return GlobalState(factors=factors, scale=scale, head=head)


def upload_tensors(up: ClientUpload, plan: AdapterPlan) -> dict[str, Tensor]:
    """Flat named tensors of what a client sends: the plan's ``upload`` factors (or Fed-SB's
    gradient estimates), plus the head (see the module docstring)."""
    out: dict[str, Tensor] = {}
    for layer, (A, B) in up.factors.items():
        for kind, t in (("A", A), ("B", B)):
            if kind in plan.upload:
                out[f"{layer}.lora_{kind}"] = t
    if "R" in plan.upload:
        for layer, R in up.cores.items():
            out[f"{layer}.lora_R"] = R
    for layer, G in up.grads.items():
        out[f"{layer}.grad"] = G
    for key, t in up.head.items():
        out[f"head.{key}"] = t
    return out


def upload_from_tensors(tensors: dict[str, Tensor], num_examples: int, scale: float,
                        plan: AdapterPlan, state: GlobalState | None = None) -> ClientUpload:
    """Inverse of :func:`upload_tensors`. A frozen factor the plan does not upload is the
    global one, taken from ``state``; a kept one is None."""
    up = ClientUpload(num_examples=num_examples, scale=scale)
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("head."):
            up.head[key[5:]] = t
            continue
        layer, _, kind = key.rpartition(".")
        if kind == "grad":
            up.grads[layer] = t
        elif kind == "lora_R" and "R" in plan.upload:
            up.cores[layer] = t
        elif kind in ("lora_A", "lora_B") and kind[-1] in plan.upload:
            parts.setdefault(layer, {})[kind[-1]] = t
        else:
            raise ValueError(f"unexpected tensor {key!r} in a client upload")
    for layer, got in parts.items():
        pair = []
        for i, kind in enumerate(("A", "B")):
            if kind in got:
                pair.append(got[kind])
            elif kind in plan.keep:
                pair.append(None)
            elif state is not None and state.factors is not None:
                pair.append(state.factors[layer][i])
            else:
                raise ValueError(f"the upload lacks {layer}.lora_{kind} and there is no global one")
        up.factors[layer] = (pair[0], pair[1])
    return up


def download_tensors(state: GlobalState, fold: dict[str, Factors], plan: AdapterPlan,
                     first: bool) -> dict[str, Tensor]:
    """What the server sends a client at the start of a round: the fold, the plan's
    ``download`` factors and the head; on a client's ``first`` download also the
    ``shared`` factors and the starting values of the ``keep`` ones."""
    out: dict[str, Tensor] = {}
    for layer, (A, B) in fold.items():
        out[f"{layer}.fold_A"], out[f"{layer}.fold_B"] = A, B
    kinds = set(plan.download) | (set(plan.shared) | set(plan.keep) if first else set())
    if "R" in kinds and state.cores is not None:
        for layer, R in state.cores.items():
            out[f"{layer}.lora_R"] = R
    if state.factors is not None:
        for layer, (A, B) in state.factors.items():
            for kind, t in (("A", A), ("B", B)):
                if kind in kinds:
                    out[f"{layer}.lora_{kind}"] = t
    for key, t in state.head.items():
        out[f"head.{key}"] = t
    return out


def download_from_tensors(tensors: dict[str, Tensor], scale: float,
                          held: dict[str, Tensor] | None = None
                          ) -> tuple[GlobalState, dict[str, Factors]]:
    """Inverse of :func:`download_tensors`: ``(state, fold)``.

    ``held``: the factors the client holds from earlier downloads or its own training
    (``<layer>.lora_<F>``: shared and kept ones), used where the download has none.
    """
    state = GlobalState(scale=scale)
    fold: dict[str, list] = {}
    got = dict(held or {})
    for key, t in tensors.items():
        if key.startswith("head."):
            state.head[key[5:]] = t
            continue
        layer, _, kind = key.rpartition(".")
        if kind in ("fold_A", "fold_B"):
            fold.setdefault(layer, [None, None])[kind == "fold_B"] = t
        elif kind in ("lora_A", "lora_B", "lora_R"):
            got[key] = t
        else:
            raise ValueError(f"unexpected tensor {key!r} in a download")
    layers = sorted({k.rpartition(".")[0] for k in got})
    cores = {lay: got[f"{lay}.lora_R"] for lay in layers if f"{lay}.lora_R" in got}
    if cores:
        state.cores = cores
    factors = {lay: (got.get(f"{lay}.lora_A"), got.get(f"{lay}.lora_B")) for lay in layers
               if f"{lay}.lora_A" in got or f"{lay}.lora_B" in got}
    if factors:
        state.factors = factors
    return state, {k: (v[0], v[1]) for k, v in fold.items()}


def probe_tensors(probes: dict[str, Probe]) -> dict[str, Tensor]:
    """Flat named tensors of an initialisation phase's probes: ``<layer>.left`` / ``<layer>.right``
    (absent: the identity); an empty dict when every probe is the dense gradient."""
    out: dict[str, Tensor] = {}
    for layer, probe in probes.items():
        for side in ("left", "right"):
            if getattr(probe, side) is not None:
                out[f"{layer}.{side}"] = getattr(probe, side).float().contiguous()
    return out


def probes_from_tensors(tensors: dict[str, Tensor], layers: list[str]) -> dict[str, Probe]:
    """Inverse of :func:`probe_tensors` for the model's adapted ``layers``."""
    unknown = [k for k in tensors if k.rpartition(".")[0] not in layers]
    if unknown:
        raise ValueError(f"a probe for {unknown[0]!r}, which is not an adapted layer of this model")
    return {layer: Probe(left=tensors.get(f"{layer}.left"), right=tensors.get(f"{layer}.right"))
            for layer in layers}
