"""Checkpoints and kept-factor files that hold no pickle: tensors in safetensors, the rest in JSON.

A checkpoint (format 1) is one safetensors file, :data:`CHECKPOINT`. Its tensors are every tensor
of the coordinator's blob, named ``<n>:<where>`` (``n`` counts from 0, ``where`` is the tensor's
place, e.g. ``2:state/factors/layer.0/0``); its metadata's one key, ``fedlora``, is a JSON document
``{"format": 1, "<blob key>": V, ...}`` (keys ``config``, ``round``, ``rows``, ``fresh_seed``,
``clip``, ``state``, ``folds``, ``gen``, ``personal``, ``residual``, ``ledgers``), with ``V`` one of

* ``{"json": x}``: a value without tensors that JSON keeps as it is (str-keyed dicts, lists, numbers);
* ``{"tensor": name, "device": "cpu"}``: a tensor (back on its device when that device exists);
* ``{"list": [V, ...]}``, ``{"tuple": [V, ...]}``, ``{"dict": [[key, V], ...]}`` (a JSON scalar key);
* ``{"dataclass": "GlobalState", "fields": {name: V}}``: one of the plain classes in :data:`CLASSES`.

Nothing else is written (saving it is a ``TypeError``) and nothing else is read, so loading runs
no code. A client's kept (personal) factors are a plain safetensors file of named tensors
(:func:`save_tensors`). The files of an older fedlora (``checkpoint.pt``, ``*.kept.pt``, written
by ``torch.save``) are read with ``torch.load(weights_only=True)``, allowing no class but
:data:`CLASSES`: one that pickles anything else is refused with a :class:`~fedlora.errors.UserError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from fedlora.errors import UserError
from fedlora.strategies import GlobalState

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # torch.save of the same blob, by fedlora before format 1
FORMAT = 1
CLASSES: dict[str, type] = {"GlobalState": GlobalState}
"""The dataclasses a checkpoint may hold (their fields stored one by one, never pickled)."""


def find_checkpoint(folder: Path) -> Path | None:
    """``folder``'s checkpoint: :data:`CHECKPOINT`, else an older fedlora's ``checkpoint.pt``, else None."""
    return next((folder / n for n in (CHECKPOINT, LEGACY_CHECKPOINT) if (folder / n).is_file()), None)


def save_checkpoint(out_dir: Path, blob: dict) -> Path:
    """Write ``blob`` to ``out_dir``/:data:`CHECKPOINT` atomically; an older ``checkpoint.pt`` there,
    now out of date, is removed. Raises ``TypeError`` for a value the format does not store."""
    tensors: dict[str, Tensor] = {}
    meta = {"fedlora": json.dumps({"format": FORMAT, **{k: _encode(v, k, tensors) for k, v in blob.items()}})}
    path = out_dir / CHECKPOINT
    _write(path, tensors, meta)
    (out_dir / LEGACY_CHECKPOINT).unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, keys: tuple[str, ...] | None = None) -> dict:
    """The blob saved by :func:`save_checkpoint` in ``path`` (a file, or a folder: see
    :func:`find_checkpoint`); a missing ``checkpoint.safetensors`` falls back to its folder's
    ``checkpoint.pt``, read by :func:`_legacy_load`. ``keys``: only these of the blob's keys (a
    check of the job reads ``config`` and ``round`` without reading a tensor)."""
    path = Path(path)
    if path.is_dir() or (path.name == CHECKPOINT and not path.is_file()):
        path = find_checkpoint(path if path.is_dir() else path.parent) or path
    if path.suffix == ".pt":
        blob = _legacy_load(path, list(CLASSES.values()))
        if not isinstance(blob, dict) or not isinstance(blob.get("state"), GlobalState):
            raise UserError(f"{path} is not a fedlora checkpoint: delete it and start the run afresh")
        return blob
    try:
        with safe_open(str(path), "pt", device="cpu") as fh:
            doc = json.loads((fh.metadata() or {})["fedlora"])
            if doc.pop("format") != FORMAT:
                raise UserError(f"{path} is a checkpoint of another fedlora version: resume with that one")
            return {key: _decode(value, fh) for key, value in doc.items() if keys is None or key in keys}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise UserError(f"{path} is not a fedlora checkpoint ({type(exc).__name__}: {exc}): resume from"
                        " the folder of a fedlora run, or delete the file to start afresh") from None


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write named tensors to the safetensors file ``path`` atomically (copies on the CPU)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, {k: _plain(t) for k, t in tensors.items()})


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Named tensors of :func:`save_tensors`' file, or of an older fedlora's ``.pt`` one (refused,
    with a :class:`~fedlora.errors.UserError`, if it pickles anything but tensors)."""
    if path.suffix != ".pt":
        try:
            with safe_open(str(path), "pt", device="cpu") as fh:
                return {name: fh.get_tensor(name) for name in fh.keys()}
        except SafetensorError as exc:
            raise UserError(f"{path} is not a safetensors file ({exc}): delete it") from None
    flat = _legacy_load(path, [])
    if not isinstance(flat, dict) or not all(isinstance(t, Tensor) for t in flat.values()):
        raise UserError(f"{path} does not hold named tensors: delete it")
    return flat


def _legacy_load(path: Path, allowed: list[type]) -> object:
    """``torch.load`` that unpickles tensors, containers and ``allowed`` classes only."""
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=None if torch.cuda.is_available() else "cpu",
                              weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        what = f"a pickled {found[1]} object" if found else "pickled data other than tensors"
        raise UserError(f"{path.name} holds {what}, which fedlora does not load (it could run code):"
                        f" fedlora never wrote that, so do not trust {str(path.parent)!r}; delete the"
                        " file to start afresh") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} cannot be read ({first}): delete it and start the run afresh") from None


def _write(path: Path, tensors: dict[str, Tensor], meta: dict[str, str] | None = None) -> None:
    """Save a safetensors file atomically: a temp file in ``path``'s folder, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(t: Tensor) -> Tensor:
    """A contiguous CPU copy sharing no storage (what safetensors writes)."""
    return t.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _is_json(x: object) -> bool:  # what JSON gives back as it is
    if x is None or isinstance(x, (bool, int, float, str)):
        return True
    if isinstance(x, list):
        return all(_is_json(v) for v in x)
    return isinstance(x, dict) and all(isinstance(k, str) and _is_json(v) for k, v in x.items())


def _encode(x: object, where: str, tensors: dict[str, Tensor]) -> dict:
    if _is_json(x):
        return {"json": x}
    if isinstance(x, Tensor):
        name = f"{len(tensors)}:{where}"
        tensors[name] = _plain(x)
        return {"tensor": name, "device": str(x.device)}
    if isinstance(x, (list, tuple)):
        return {"tuple" if isinstance(x, tuple) else "list": [_encode(v, f"{where}/{i}", tensors)
                                                               for i, v in enumerate(x)]}
    if isinstance(x, dict):
        bad = [k for k in x if type(k) not in (str, int, float, bool, type(None))]
        if bad:
            raise TypeError(f"a checkpoint cannot store {where}: its key {bad[0]!r} is not a JSON scalar")
        return {"dict": [[k, _encode(v, f"{where}/{k}", tensors)] for k, v in x.items()]}
    if type(x).__name__ in CLASSES and CLASSES[type(x).__name__] is type(x):
        return {"dataclass": type(x).__name__,
                "fields": {f.name: _encode(getattr(x, f.name), f"{where}/{f.name}", tensors)
                           for f in dataclasses.fields(x)}}
    raise TypeError(f"a checkpoint cannot store {where}, a {type(x).__qualname__}: it holds tensors,"
                    f" lists, tuples, dicts, JSON values and {', '.join(CLASSES)} only (no pickle)")


def _decode(v: dict, fh) -> object:
    kind, x = next(iter(v.items()))  # the entry's tag comes first
    if kind == "json":
        return x
    if kind == "tensor":
        t = fh.get_tensor(x)
        device = torch.device(v["device"])
        usable = device.type == "cuda" and (device.index or 0) < torch.cuda.device_count()
        return t.to(device) if usable else t
    if kind in ("list", "tuple"):
        items = [_decode(i, fh) for i in x]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _decode(i, fh) for k, i in x}
    if kind == "dataclass":
        if x not in CLASSES:
            raise ValueError(f"it names the class {x!r}, not one a checkpoint holds")
        cls = CLASSES[x]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        got = {name: _decode(i, fh) for name, i in v["fields"].items()}
        if set(got) - set(fields):
            raise ValueError(f"{x} has no field {sorted(set(got) - set(fields))[0]!r}")
        obj = cls(**{k: i for k, i in got.items() if fields[k].init})
        for k in (k for k in got if not fields[k].init):
            setattr(obj, k, got[k])
        return obj
    raise ValueError(f"unknown entry {kind!r}")
