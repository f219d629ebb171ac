"""Move adapter state between a :class:`FederatedModel`'s slots and strategy payloads.

Also the flat, named tensor form of uploads and downloads (the names are the keys of
Flower ``ArrayRecord``\\ s and of byte accounting):

* ``<layer>.lora_A`` ``(r, d_in)``, ``<layer>.lora_B`` ``(d_out, r)`` — LoRA factors;
* ``<layer>.lora_R`` ``(r, r)`` — LoRA-SB core;
* ``<layer>.grad`` ``(d_out, d_in)`` — Fed-SB initialisation gradient estimate;
* ``<layer>.fold_A`` / ``<layer>.fold_B`` — FLoRA stacks to fold into the base;
* ``head.<module>.weight`` / ``head.<module>.bias`` — task head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.model import FederatedModel, draw_seed
from fedlora.strategies import ClientUpload, GlobalState
from fedlora.strategies.base import Factors


def head_of(fm: FederatedModel, k: int) -> dict[str, Tensor]:
    """Slot k's task-head tensors, named ``<module>.weight`` / ``<module>.bias``."""
    return {f"{name}.{key}": t for name, layer in fm.heads.items()
            for key, t in layer.get_slot(k).items()}


def extract_upload(fm: FederatedModel, k: int, num_examples: int) -> ClientUpload:
    """Client slot k's trained adapter (or LoRA-SB cores) and head."""
    head = head_of(fm, k)
    if fm.config.mode == "lora-sb":
        cores = {name: layer.get_core(k) for name, layer in fm.adapters.items()}
        scale = float(next(iter(fm.adapters.values())).scale[k])
        return ClientUpload(num_examples=num_examples, cores=cores, scale=scale, head=head)
    factors = {name: layer.get_slot(k) for name, layer in fm.adapters.items()}
    scale = float(next(iter(fm.adapters.values())).scale[k])
    return ClientUpload(num_examples=num_examples, factors=factors, scale=scale, head=head)


def _set_heads(fm: FederatedModel, head: dict[str, Tensor]) -> None:
    for name, layer in fm.heads.items():
        sub = {"weight": head[f"{name}.weight"], "bias": head[f"{name}.bias"]}
        for k in range(fm.num_clients):
            layer.set_slot(k, sub)


def apply_global(fm: FederatedModel, state: GlobalState, fold: dict[str, Factors],
                 fresh_seed: int | None = None) -> None:
    """Load the global state into every slot, after folding ``fold`` into the base.

    With ``state.factors`` None (FLoRA) every slot gets a fresh adapter drawn from
    ``fresh_seed`` (see :func:`fedlora.model.draw_seed`).
    """
    for name, (A, B) in fold.items():
        fm.adapters[name].fold(A, B)
    if fm.config.mode == "lora-sb":
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
            for k in range(fm.num_clients):
                layer.set_slot(k, *state.factors[name])
    if state.head:
        _set_heads(fm, state.head)


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


def upload_tensors(up: ClientUpload) -> dict[str, Tensor]:
    """Flat named tensors of an upload (see the module docstring)."""
    out: dict[str, Tensor] = {}
    for layer, (A, B) in up.factors.items():
        out[f"{layer}.lora_A"], out[f"{layer}.lora_B"] = A, B
    for layer, R in up.cores.items():
        out[f"{layer}.lora_R"] = R
    for layer, G in up.grads.items():
        out[f"{layer}.grad"] = G
    for key, t in up.head.items():
        out[f"head.{key}"] = t
    return out


def upload_from_tensors(tensors: dict[str, Tensor], num_examples: int, scale: float) -> ClientUpload:
    """Inverse of :func:`upload_tensors`."""
    up = ClientUpload(num_examples=num_examples, scale=scale)
    for key, t in tensors.items():
        if key.startswith("head."):
            up.head[key[5:]] = t
            continue
        layer, _, kind = key.rpartition(".")
        if kind == "lora_A":
            up.factors[layer] = (t, tensors[f"{layer}.lora_B"])
        elif kind == "lora_R":
            up.cores[layer] = t
        elif kind == "grad":
            up.grads[layer] = t
        elif kind != "lora_B":
            raise ValueError(f"unexpected tensor {key!r} in a client upload")
    return up


def download_tensors(state: GlobalState, fold: dict[str, Factors],
                     with_shared: bool) -> dict[str, Tensor]:
    """What the server sends a client at the start of a round.

    ``with_shared``: include LoRA-SB's frozen A and B (only when the client does not
    have them yet).
    """
    out: dict[str, Tensor] = {}
    for layer, (A, B) in fold.items():
        out[f"{layer}.fold_A"], out[f"{layer}.fold_B"] = A, B
    if state.cores is not None:
        for layer, R in state.cores.items():
            out[f"{layer}.lora_R"] = R
            if with_shared and state.factors is not None:
                out[f"{layer}.lora_A"], out[f"{layer}.lora_B"] = state.factors[layer]
    elif state.factors is not None:
        for layer, (A, B) in state.factors.items():
            out[f"{layer}.lora_A"], out[f"{layer}.lora_B"] = A, B
    for key, t in state.head.items():
        out[f"head.{key}"] = t
    return out


def download_from_tensors(tensors: dict[str, Tensor], scale: float,
                          shared: dict[str, Factors] | None = None
                          ) -> tuple[GlobalState, dict[str, Factors]]:
    """Inverse of :func:`download_tensors`: ``(state, fold)``.

    ``shared``: LoRA-SB's frozen factors received earlier, used when the download
    carries cores without them.
    """
    state = GlobalState(scale=scale)
    fold: dict[str, Factors] = {}
    factors: dict[str, list] = {}
    cores: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key.startswith("head."):
            state.head[key[5:]] = t
            continue
        layer, _, kind = key.rpartition(".")
        if kind in ("fold_A", "fold_B"):
            fold.setdefault(layer, [None, None])[kind == "fold_B"] = t
        elif kind in ("lora_A", "lora_B"):
            factors.setdefault(layer, [None, None])[kind == "lora_B"] = t
        elif kind == "lora_R":
            cores[layer] = t
        else:
            raise ValueError(f"unexpected tensor {key!r} in a download")
    fold = {k: (v[0], v[1]) for k, v in fold.items()}
    if cores:
        state.cores = cores
        state.factors = {k: (v[0], v[1]) for k, v in factors.items()} if factors else shared
    elif factors:
        state.factors = {k: (v[0], v[1]) for k, v in factors.items()}
    return state, fold
