"""Private, public and validation parts of a training file, disjoint by source sentence.

    python benchmarks/splits.py --data ../shared/data/sst2/train.tsv --out runs/splits \\
        [--public 0.015] [--validation 0.1] [--seed 0] [--by random]

SST-2's 67,349 training rows are the phrases of about 6.9k movie-review sentences: a sentence and
the pieces of its parse tree, each labelled. A random split of the rows puts pieces of one sentence
on both sides (of 120 random "public" phrases of 8+ words, 90 sit inside a private phrase), so
whatever learns from the public part has seen private text. The split here is by **source**:

* a *root* is a phrase contained in no other phrase (word-bounded, after SST's tokenisation): a
  sentence, or as much of one as SST kept;
* the roots are shuffled with the seed and dealt to the parts by their fractions of the roots
  (``public``, ``validation``, the rest ``private``);
* every other phrase goes to the part of the roots that contain it. A phrase inside roots of two
  parts (a common piece such as "the film") cannot be placed without leaking, so it is dropped
  and counted.

Then no phrase of one part occurs inside a phrase of another part (:func:`leaks` checks it).
BBC News articles are separate documents, so ``--by random`` (a seeded random split of the rows)
is a valid split there.

Every benchmark that needs public or validation data calls :func:`split_file`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

#: The parts, in the order their files are written.
PARTS = ("private", "public", "validation")


def spans(phrase: str) -> set[str]:
    """Every run of whole words of ``phrase`` (itself included): what it contains."""
    words = phrase.split()
    return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}


def contained(phrases: Sequence[str]) -> set[str]:
    """Every run of whole words of any of ``phrases``."""
    out: set[str] = set()
    for p in phrases:
        out |= spans(p)
    return out


def roots(phrases: Sequence[str]) -> list[int]:
    """Indices of the phrases contained in no other phrase, longest first.

    Longest first, a phrase is a root unless a root kept so far contains it: anything containing
    it is longer, and is a root or inside one (containment is transitive)."""
    order = sorted(range(len(phrases)), key=lambda i: (-len(phrases[i].split()), i))
    kept: list[int] = []
    inside: set[str] = set()
    for i in order:
        if " ".join(phrases[i].split()) not in inside:
            kept.append(i)
            inside |= spans(phrases[i])
    return kept


def split_by_source(phrases: Sequence[str], fractions: dict[str, float], seed: int,
                    top: list[int] | None = None) -> tuple[dict[str, list[int]], list[int]]:
    """``({part: row indices}, dropped)``: the roots dealt by ``fractions`` (of the roots; the
    remainder is ``private``), then every phrase to the one part whose roots contain it
    (``dropped``: the phrases inside roots of two or more parts). ``top``: :func:`roots` of
    ``phrases``, when the caller has them."""
    top = list(roots(phrases) if top is None else top)
    random.Random(seed).shuffle(top)
    owner: dict[str, list[int]] = {}
    start = 0
    for part in PARTS[1:]:
        n = round(fractions.get(part, 0.0) * len(top))
        owner[part] = top[start:start + n]
        start += n
    owner["private"] = top[start:]
    inside = {part: contained([phrases[i] for i in idx]) for part, idx in owner.items()}
    out: dict[str, list[int]] = {part: [] for part in PARTS}
    dropped: list[int] = []
    for i, p in enumerate(phrases):
        key = " ".join(p.split())
        homes = [part for part in PARTS if key in inside[part]]
        (out[homes[0]] if len(homes) == 1 else dropped).append(i)
    return out, dropped


def split_random(n: int, fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """A seeded random split of ``n`` independent rows (documents) by ``fractions``."""
    order = random.Random(seed).sample(range(n), n)
    out, start = {}, 0
    for part in PARTS[1:]:
        k = round(fractions.get(part, 0.0) * n)
        out[part] = sorted(order[start:start + k])
        start += k
    out["private"] = sorted(order[start:])
    return {part: out[part] for part in PARTS}


def leaks(parts: dict[str, Sequence[str]]) -> list[tuple[str, str, str]]:
    """``(part, other part, phrase)`` for every phrase found inside a phrase of another part."""
    inside = {part: contained(phrases) for part, phrases in parts.items()}
    return [(part, other, p) for part, phrases in parts.items() for p in phrases
            for other in parts if other != part and " ".join(p.split()) in inside[other]]


def split_file(src: Path, out: Path, fractions: dict[str, float], seed: int = 0,
               by: str = "source", text_column: str = "sentence") -> dict[str, Path]:
    """Write ``out/{private,public,validation}.tsv`` (same header as ``src``) and
    ``out/split.json`` (sizes, dropped count); reuse them if ``split.json`` matches and every part is
    there (a run record may keep ``split.json`` alone: the parts are written again, the same rows).
    Returns the paths."""
    meta = {"src": str(Path(src).resolve()), "fractions": fractions, "seed": seed, "by": by}
    paths = {part: out / f"{part}.tsv" for part in PARTS}
    record = out / "split.json"
    if (record.is_file() and all(path.is_file() for path in paths.values())
            and {k: v for k, v in json.loads(record.read_text()).items() if k in meta} == meta):
        return paths
    header, *rows = Path(src).read_text().splitlines()
    col = header.split("\t").index(text_column)
    phrases = [r.split("\t")[col] for r in rows]
    top = roots(phrases) if by == "source" else None
    if by == "source":
        parts, dropped = split_by_source(phrases, fractions, seed, top)
    elif by == "random":
        parts, dropped = split_random(len(rows), fractions, seed), []
    else:
        raise ValueError(f"unknown split {by!r}; use source or random")
    out.mkdir(parents=True, exist_ok=True)
    for part, idx in parts.items():
        paths[part].write_text("\n".join([header, *(rows[i] for i in sorted(idx))]) + "\n")
    sizes = {part: len(idx) for part, idx in parts.items()}
    record.write_text(json.dumps({**meta, "rows": sizes, "dropped": len(dropped),
                                  "roots": None if top is None else len(top)}, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a .tsv training file")
    p.add_argument("--text-column", default="sentence")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--public", type=float, default=0.015, help="fraction of the roots (or rows)")
    p.add_argument("--validation", type=float, default=0.1, help="fraction of the roots (or rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--by", choices=("source", "random"), default="source")
    p.add_argument("--check", action="store_true", help="verify that no part's phrase is inside another's")
    args = p.parse_args(argv)
    paths = split_file(args.data, args.out, {"public": args.public, "validation": args.validation},
                       args.seed, args.by, args.text_column)
    print((args.out / "split.json").read_text().strip())
    if args.check:
        parts = {}
        for part, path in paths.items():
            header, *rows = path.read_text().splitlines()
            col = header.split("\t").index(args.text_column)
            parts[part] = [r.split("\t")[col] for r in rows]
        bad = leaks(parts)
        print(f"{len(bad)} phrases of one part inside another part's phrases")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
