"""Hub dataset ids (``ORG/NAME`` or ``ORG/NAME:SPLIT``) as files of the local Hugging Face cache.

``hf download ORG/NAME --repo-type dataset`` (or ``datasets``/``huggingface_hub`` downloads) keep a
dataset repository's files under ``$HF_HUB_CACHE/datasets--ORG--NAME/snapshots/REVISION/``, with
``refs/main`` naming the revision. :func:`locate_hub_dataset` finds a split's data files there,
reading nothing but the file system: nothing is ever downloaded.

A file belongs to split ``S`` when ``S`` is a whole part of its path inside the snapshot (split by
``/``, ``-``, ``_`` and ``.``: ``data/train-00000-of-00002.parquet``, ``train.jsonl``,
``sst2/train/0.parquet``); ``CONFIG/S`` names a configuration's split, every part a whole part of
the path (``cais/mmlu:all/test`` is ``all/test-00000-of-00001.parquet``). Without ``:SPLIT`` the split
is ``train``, and a repository of one data file (``alpaca_data.json``) is that file, whatever its
name. A split in several shard files becomes the pattern of their names (``data/train-*.parquet``),
whose rows are read in name order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fedlora.errors import UserError

#: ``ORG/NAME`` with an optional ``:SPLIT``.
HUB_DATASET = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)"
                         r"(?::(?P<split>[\w.-]+(?:/[\w.-]+)*))?")
DEFAULT_SPLIT = "train"


def hub_cache() -> Path:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE``, ``HF_HOME``/hub, or the default)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of dataset ``repo`` (its ``main`` revision, else its only one)."""
    root = hub_cache() / f"datasets--{repo.replace('/', '--')}"
    ref = root / "refs" / "main"
    main = root / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    if main is not None and main.is_dir():
        return main
    found = sorted(p for p in (root / "snapshots").glob("*") if p.is_dir())
    return found[0] if len(found) == 1 else None


def _in_split(relative: str, split: str) -> bool:
    parts = re.split(r"[/_.-]", relative.lower())
    return all(part in parts for part in split.lower().split("/"))


def locate_hub_dataset(spec: str, suffixes: tuple[str, ...]) -> Path | None:
    """The local path of hub dataset ``spec``'s split: one file, or a name pattern of its shards;
    None when ``spec`` is not a hub dataset id.

    Raises
    ------
    UserError
        The dataset is not in the cache (name the download command), or its files do not tell
        the split apart.
    """
    match = HUB_DATASET.fullmatch(spec)
    if match is None or Path(spec).expanduser().exists() or spec.lower().endswith(suffixes):
        return None  # a path (a missing data/train.csv is a file not found, not a hub id)
    repo, split = match["repo"], match["split"] or DEFAULT_SPLIT
    home = snapshot(repo)
    if home is None:
        raise UserError(f"data {spec!r} is not a local file or folder, nor a dataset in the Hugging Face"
                        f" cache ({hub_cache()}); nothing is downloaded at run time: fetch it once with"
                        f" `hf download {repo} --repo-type dataset`")
    files = sorted(p for p in home.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    named = [p for p in files if _in_split(p.relative_to(home).as_posix(), split)]
    if not named and match["split"] is None and len(files) == 1:
        named = files
    if not named:
        listed = ", ".join(p.relative_to(home).as_posix() for p in files[:6]) or "no data files"
        raise UserError(f"dataset {repo!r} in the cache has no {split!r} split file ({listed}); name a"
                        f" split as {repo}:SPLIT, or pass a file's path")
    folders = sorted({p.parent.relative_to(home).as_posix() for p in named})
    if len(folders) > 1:
        raise UserError(f"dataset {repo!r} has {split!r} files in {len(folders)} folders"
                        f" ({', '.join(folders[:5])}); name one as {repo}:{folders[0]}/{split}")
    return named[0] if len(named) == 1 else shard_pattern(named, repo)


def shard_pattern(files: list[Path], repo: str) -> Path:
    """One name pattern in one folder that matches ``files`` and nothing else (refused otherwise)."""
    folder, head = files[0].parent, os.path.commonprefix([p.name for p in files])
    pattern = folder / f"{head}*{files[0].suffix}"
    if sorted(folder.glob(pattern.name)) != files:
        raise UserError(f"dataset {repo!r}: its split's {len(files)} files are not one folder's"
                        f" {head}* files; pass a file's path")
    return pattern
