"""A job's file paths as a run records them: absolute, so that its ``config.json`` names the same
files from any folder (``fedlora-sim --config runs/x/config.json`` run elsewhere, ``--resume``).

A value is made absolute only where it names something on this disk (a file, a folder, or a pattern
that matches files), and never where it is a built-in name (``minilm``, ``bbcnews``) or a hub id
that is not a local path: those mean the same from every folder.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from fedlora.data.instructions import BBC_INSTRUCT
from fedlora.data.loading import DEFAULT_DATASET
from fedlora.data.readers import is_pattern, locate, matching
from fedlora.job.schema import JobConfig
from fedlora.models.hub import DEFAULT_MODEL, SMOLLM2

#: The job fields that may name files or folders.
PATH_FIELDS = ("model", "data", "test_data", "init_data", "init_adapter", "quant_calibration")
#: Values of those fields that are names, not paths.
BUILT_IN = (DEFAULT_MODEL, SMOLLM2, DEFAULT_DATASET, BBC_INSTRUCT)


def recorded_value(name: str, value: Any) -> Any:
    """``value`` of job field ``name`` as a run records it: a path on this disk made absolute."""
    if name not in PATH_FIELDS or not isinstance(value, str) or not value or value in BUILT_IN:
        return value
    path = os.path.expanduser(value)
    if os.path.exists(path) or glob.glob(path):  # a file, a folder, or a pattern of files
        return os.path.abspath(path)
    return value


def with_recorded_paths(cfg: JobConfig) -> JobConfig:
    """``cfg`` with its paths as :func:`recorded_value` gives them (the server's run config)."""
    return replace(cfg, **{name: recorded_value(name, getattr(cfg, name)) for name in PATH_FIELDS})


def recorded(cfg: JobConfig) -> dict[str, Any]:
    """``cfg`` as a run records it (``config.json``, checkpoints): :func:`with_recorded_paths`."""
    return asdict(with_recorded_paths(cfg))


def same_setting(cfg: JobConfig, name: str, before: Any) -> bool:
    """Whether ``cfg``'s field ``name`` is the setting ``before`` (a stopped run's): the same files
    however either names them, and for ``ranks`` the same rank for each of ``cfg``'s clients (older
    runs stored them cycled over their clients)."""
    now = getattr(cfg, name)
    if name == "ranks" and before and now:
        return [before[k % len(before)] for k in range(cfg.num_clients)] == cfg.client_ranks()
    return recorded_value(name, before) == recorded_value(name, now)


#: The job fields whose files hold the data a run reads (a resumed run must read them unchanged).
DATA_FIELDS = ("data", "test_data", "init_data", "quant_calibration")


def data_digests(cfg: JobConfig) -> dict[str, str]:
    """Field -> :func:`digest_of` each of :data:`DATA_FIELDS` that names local data in ``cfg``."""
    digests = {name: digest_of(getattr(cfg, name)) for name in DATA_FIELDS}
    return {name: d for name, d in digests.items() if d is not None}


def digest_of(value: str | None, names: bool = True) -> str | None:
    """SHA-256 of the files a data value reads (a file, the files a pattern matches, or every file
    under a folder, with their names; without ``names``, of their contents alone, so that a renamed
    copy has it too); None for built-in data, or none there. Each file is hashed once a process while
    its size and time stay."""
    if not value or value in BUILT_IN:
        return None
    root = locate(value)
    if is_pattern(root):
        files, root = matching(root), root.parent
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        files, root = ([root] if root.is_file() else []), root.parent
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        content = _file_digest(str(f), st.st_size, st.st_mtime_ns)
        h.update(f"{f.relative_to(root) if names else ''}\0{content}\0".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
