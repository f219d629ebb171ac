"""Fed-SB's initialisation: what the sketch saves in bytes and what it costs in accuracy.

1. **Bytes** (printed first, no run needed): each client's initialisation upload per layer is
   the dense gradient ``d_out × d_in`` (``--strategy-options init=dense``) or the two sketches
   ``G_k Ω`` (``d_out × w``) and ``Qᵀ G_k`` (``w × d_in``) (``init=sketch``, the default,
   ``w = 2r``), float32, for MiniLM (q, v of 6 layers, 384 × 384, r = 8) and a 7B LLaMA
   (q, v of 32 layers, 4096 × 4096, r = 16).
2. **Accuracy**: the same Fed-SB job with ``init=dense`` (LoRA-SB's sign step, the old
   default), ``init=sketch`` (the SGD-like step from sketches) and ``init=seed`` (no data) on
   BBC News and on a seeded 5,000-phrase sample of SST-2 (``../shared/data/sst2``): 10 IID
   clients, ``--rounds`` rounds of 10 local steps; the measured round-0 bytes up per client
   beside the accuracy after round 1 and after the last round.

Usage: ``python benchmarks/fedsb_init.py --out runs/fedsb_init`` (~12 min on 2 CPU cores);
``--bytes-only`` prints part 1 alone. Finished runs in ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from stats import read_rows

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"MiniLM (q,v × 6 layers, 384², r = 8)": (12, 384, 384, 8),
          "LLaMA-7B (q,v × 32 layers, 4096², r = 16)": (64, 4096, 4096, 16)}


def bytes_table() -> list[str]:
    lines = ["| model | dense G_k per client | sketches (w = 2r) per client | sketch / dense |",
             "|---|---:|---:|---:|"]
    for name, (layers, d_out, d_in, r) in MODELS.items():
        w = 2 * r
        dense = layers * d_out * d_in * 4
        sketch = layers * w * (d_out + d_in) * 4
        lines.append(f"| {name} | {dense / 1e6:,.1f} MB | {sketch / 1e6:,.2f} MB | {sketch / dense:.1%} |")
    return lines


def sst2_sample(out: Path, n: int = 5000, seed: int = 0) -> Path:
    """A seeded sample of SST-2's training phrases as a TSV (text, label)."""
    path = out / "sst2-5k.tsv"
    if not path.is_file():
        rows = (ROOT.parent / "shared" / "data" / "sst2" / "train.tsv").read_text().splitlines()[1:]
        random.Random(seed).shuffle(rows)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text("label\ttext\n" + "\n".join(rows[:n]) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/fedsb_init"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bytes-only", action="store_true")
    args = p.parse_args(argv)
    print("\n".join(bytes_table()))
    if args.bytes_only:
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedlora.simulations.cli import main as sim

    datasets = {"bbcnews": ["--data", "bbcnews"],
                "sst2-5k": ["--data", str(sst2_sample(args.out)), "--max-length", "32"]}
    lines = ["| data | init | acc after round 1 | final acc | round-0 bytes up / client | round-0 bytes down"
             " / client |", "|---|---|---:|---:|---:|---:|"]
    for data, flags in datasets.items():
        for init in ("dense", "sketch", "seed"):
            out = args.out / f"{data}-{init}"
            if not (out / "adapter").is_dir():
                code = sim([*flags, "--strategy", "fed-sb", "--strategy-options", f"init={init}",
                            "--num-clients", "10", "--rounds", str(args.rounds), "--out", str(out),
                            "--quiet", "--overwrite"])
                if code != 0:
                    raise SystemExit(f"fed-sb init={init} on {data} failed")
            rows = read_rows(out)
            up = rows[0]["bytes_up"] / max(rows[0]["clients"], 1)
            down = rows[0]["bytes_down"] / max(rows[0]["clients"], 1)
            lines.append(f"| {data} | {init} | {rows[1]['accuracy']:.1%} | {rows[-1]['accuracy']:.1%} |"
                         f" {up / 1e6:.3f} MB | {down / 1e6:.3f} MB |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
