"""Hub dataset ids (``ORG/NAME`` or ``ORG/NAME:SPLIT``) as files of the local Hugging Face cache.

``hf download ORG/NAME --repo-type dataset`` (or ``datasets``/``huggingface_hub`` downloads) keep a
dataset repository's files under ``$HF_HUB_CACHE/datasets--ORG--NAME/snapshots/REVISION/``, with
``refs/main`` naming the revision. :func:`locate_hub_dataset` finds a split's data files there,
reading nothing but the file system: nothing is ever downloaded.

A file belongs to split ``S`` when its name, without the data suffix and a shard number, is ``S``
as a whole (``data/train-00000-of-00002.parquet``, ``train.jsonl``), or when its name is a shard
number alone and its folder is ``S`` (``sst2/train/0.parquet``): ``train`` is neither ``train_prefs``
nor ``train_sft`` (UltraFeedback's splits), ``validation`` neither of GLUE's ``validation_matched`` and
``validation_mismatched``. ``CONFIG/S`` names a configuration's split, each ``CONFIG`` part a folder
above the file (``cais/mmlu:all/test`` is ``all/test-00000-of-00001.parquet``). Without ``:SPLIT``
the split is ``train``; a repository of one data file (``alpaca_data.json``) is that file, whatever
its name, and one of other splits alone (``train_prefs``, ``train_sft``, ...) is refused, listing
them. A split in several shard files becomes the pattern of their names (``data/train-*.parquet``),
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


#: A shard's number at the end of a file's name: ``-00000-of-00002`` (with the hash that older
#: conversions add: ``-00000-of-00001-3b1b0c39e2bea6e9``), ``-00000``, ``_0`` or ``.0``.
SHARD = re.compile(r"[-_.]\d+(?:-of-\d+)?(?:-[0-9a-f]{8,})?$")
#: A file's name that is a shard's number alone (``0.parquet``, ``0000.parquet``): its folder is the split.
NUMBERED = re.compile(r"\d+(?:-of-\d+)?")


def split_of(relative: str, suffixes: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """``(the split, the folders above it)`` of the data file at ``relative`` (a path inside the
    snapshot, ``/``-separated), all in lower case; ``suffixes``: the data files' name ends."""
    *folders, name = relative.lower().split("/")
    suffix = max((s for s in suffixes if name.endswith(s)), key=len, default="")
    stem = name[:len(name) - len(suffix)]
    if NUMBERED.fullmatch(stem) and folders:
        return folders[-1], tuple(folders[:-1])
    return SHARD.sub("", stem), tuple(folders)


def _in_split(place: tuple[str, tuple[str, ...]], split: str) -> bool:
    """Whether a file at ``place`` (:func:`split_of`) is in ``split`` (``S`` or ``CONFIG/S``)."""
    *config, name = split.lower().split("/")
    return place[0] == name and all(part in place[1] for part in config)


def _splits(places: list[tuple[str, tuple[str, ...]]]) -> str:
    """The splits of ``places`` as ``:SPLIT`` names them (``CONFIG/S`` where they lie in several
    folders), at most 12."""
    several = len({under for _, under in places}) > 1
    listed = sorted({"/".join(under[-1:] + (name,)) if several else name for name, under in places})
    return ", ".join(listed[:12]) + (f", ... ({len(listed)} in all)" if len(listed) > 12 else "")


def locate_hub_dataset(spec: str, suffixes: tuple[str, ...]) -> Path | None:
    """The local path of hub dataset ``spec``'s split: one file, or a name pattern of its shards;
    None when ``spec`` is not a hub dataset id.

    Raises
    ------
    UserError
        The dataset is not in the cache (name the download command), it has no such split (or,
        without ``:SPLIT``, no ``train`` split and several data files), or its files do not tell
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
    places = [split_of(p.relative_to(home).as_posix(), suffixes) for p in files]
    named = [(p, place) for p, place in zip(files, places, strict=True) if _in_split(place, split)]
    if not named and match["split"] is None and len(files) == 1:
        named = [(files[0], places[0])]
    if not named:
        listed = f"its splits: {_splits(places)}" if files else "no data files"
        raise UserError(f"dataset {repo!r} in the cache has no {split!r} split ({listed}); name a"
                        f" split as {repo}:SPLIT, or pass a file's path")
    folders = sorted({p.parent.relative_to(home).as_posix() for p, _ in named})
    if len(folders) > 1:
        name, above = named[0][1]
        raise UserError(f"dataset {repo!r} has {split!r} files in {len(folders)} folders"
                        f" ({', '.join(folders[:5])}); name one as {repo}:{'/'.join(above[-1:] + (name,))}")
    return named[0][0] if len(named) == 1 else shard_pattern([p for p, _ in named], repo)


def shard_pattern(files: list[Path], repo: str) -> Path:
    """One name pattern in one folder that matches ``files`` and nothing else (refused otherwise)."""
    folder, head = files[0].parent, os.path.commonprefix([p.name for p in files])
    pattern = folder / f"{head}*{files[0].suffix}"
    if sorted(folder.glob(pattern.name)) != files:
        raise UserError(f"dataset {repo!r}: its split's {len(files)} files are not one folder's"
                        f" {head}* files; pass a file's path")
    return pattern
