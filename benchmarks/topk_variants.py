"""Why ``--compress topk:0.1`` misses at 3 rounds: where the kept 10% goes, and error feedback.

    python benchmarks/topk_variants.py [--out runs/topk] [--rounds 3] [--variants per-tensor,...]
                                       [--job-flags '--optimizer sgd --lr 0.1']

The job is ``benchmarks/compression.py``'s ``bbc`` FedAvg run (MiniLM, the BBC News defaults,
10 clients, 3 rounds, seed 0), once per variant, in ``OUT/<variant>/``:

* ``none``: uploads uncoded (the reference);
* ``per-tensor``: fedlora's ``topk:0.1`` (each tensor keeps its ``⌈0.1 n⌉`` largest entries), with
  error feedback;
* ``global``: one threshold over the whole upload (the ``⌈0.1 N⌉`` largest of all its ``N``
  entries, however they fall across tensors);
* ``head-whole``: per tensor on the adapters, the classifier head sent whole;
* ``no-feedback``: ``per-tensor`` with ``--no-error-feedback``.

``global`` and ``head-whole`` are not fedlora codings: for their run this script replaces
:func:`fedlora.rounds.compress.pack` / :func:`~fedlora.rounds.compress.unpack` with a coding in which
each tensor ships a variable number of int32 indices (its main part) and their float32 values (the
side part), so their bytes are not what fedlora would ship. The table gives the test accuracy per
round, the final gap to ``none``, the upload bytes as a share of ``none``'s and the last round's
``compress_error``. Finished runs are reused. About 75 s a run on a quiet 2-core CPU.

The ``per-tensor`` run also records, for every coded tensor ``x = θ − ref + e``, the share of its
squared norm that its kept entries hold (``OUT/per-tensor/energy.json``); a second table gives it per
round and kind of tensor (LoRA's ``lora_A``, ``lora_B``, the head's weight and bias) beside a
Gaussian's: the ``F n`` largest of ``n`` normal entries hold ``2 (c φ(c) + 1 − Φ(c))`` of the
squared norm, ``c = Φ⁻¹(1 − F/2)`` (0.44 at F = 0.1). A share near or under the Gaussian's means the
update is dense, and top-k sends under half of it a round.
"""

from __future__ import annotations

import argparse
import math
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from stats import read_rows

import fedlora.rounds.compress as codings

VARIANTS = {"none": [], "per-tensor": ["--compress", "topk:0.1"], "global": ["--compress", "topk:0.1"],
            "head-whole": ["--compress", "topk:0.1"],
            "no-feedback": ["--compress", "topk:0.1", "--no-error-feedback"]}
HEAD = ("classifier", "pre_classifier", "score")
CLIENTS = 10
ENERGY = "energy.json"


def kept(kind: str, k_of, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> sorted flat indices each tensor keeps under ``kind`` (``k_of(n)``: a tensor's k)."""
    flat = {name: t.detach().float().reshape(-1) for name, t in tensors.items()}
    if kind == "global":
        every = torch.cat([v.abs() for v in flat.values()])
        threshold = every.topk(k_of(every.numel())).values[-1]
        return {name: torch.nonzero(v.abs() >= threshold).reshape(-1) for name, v in flat.items()}
    return {name: (torch.arange(v.numel()) if any(h in name for h in HEAD)
                   else torch.sort(v.abs().topk(k_of(v.numel())).indices).values)
            for name, v in flat.items()}


def patch(kind: str) -> None:
    """Replace fedlora's top-k message coding with ``kind``'s (``global`` or ``head-whole``)."""
    pack, unpack = codings.pack, codings.unpack

    def variant_pack(scheme, tensors):
        if not isinstance(scheme, codings.TopK) or not tensors:
            return pack(scheme, tensors)
        idx = kept(kind, scheme.k, tensors)
        names = sorted(tensors)
        message = {name: idx[name].to(torch.int32) for name in names}
        message[codings.SIDE] = torch.cat([tensors[n].detach().float().reshape(-1)[idx[n]] for n in names])
        dims = [d for n in names for d in (tensors[n].dim(), *tensors[n].shape)]
        message[codings.SHAPES] = torch.tensor(dims, dtype=torch.int32)
        return message

    def variant_unpack(scheme, message, expected=None):
        if not isinstance(scheme, codings.TopK) or not message:
            return unpack(scheme, message, expected)
        dims, at, side, out = message[codings.SHAPES].tolist(), 0, message[codings.SIDE], {}
        for name in sorted(k for k in message if k not in (codings.SIDE, codings.SHAPES)):
            shape, dims = tuple(dims[1:1 + dims[0]]), dims[1 + dims[0]:]
            idx = message[name].long()
            values = torch.zeros(math.prod(shape))
            values[idx] = side[at:at + idx.numel()].float()
            out[name], at = values.reshape(shape), at + idx.numel()
        return out

    codings.pack, codings.unpack = variant_pack, variant_unpack


def kind_of(name: str) -> str:
    """The last part of an uploaded tensor's name (LoRA's ``lora_A``, ``lora_B``), after ``head`` for
    a head's (``head weight``, ``head bias``)."""
    last = name.rsplit(".", 1)[-1]
    return f"head {last}" if any(h in name for h in HEAD) else last


def gaussian_share(fraction: float) -> float:
    """The share of the squared norm that the largest ``fraction`` of normal entries hold."""
    from statistics import NormalDist

    c = NormalDist().inv_cdf(1 - fraction / 2)
    return 2 * (c * NormalDist().pdf(c) + 1 - NormalDist().cdf(c))


def record_energy(path: Path) -> None:
    """Make fedlora's top-k coding append each tensor's ``[kind, entries, kept share of ‖x‖²]`` per
    coded upload to ``path`` (a JSON list of uploads, in coding order)."""
    import atexit
    import json

    pack, uploads = codings.pack, []

    def recording_pack(scheme, tensors):
        if isinstance(scheme, codings.TopK) and tensors:
            upload = []
            for name, t in sorted(tensors.items()):
                sq = t.detach().float().reshape(-1).pow(2)
                top = sq.topk(scheme.k(sq.numel())).values.sum()
                upload.append([kind_of(name), sq.numel(), float(top / sq.sum()) if sq.sum() > 0 else 1.0])
            uploads.append(upload)
        return pack(scheme, tensors)

    codings.pack = recording_pack
    atexit.register(lambda: path.write_text(json.dumps(uploads)))


def energy_table(path: Path, clients: int, fraction: float = 0.1) -> str:
    """Per round and kind: the mean kept share of ``‖x‖²`` over the round's uploads' tensors."""
    import json

    uploads = json.loads(path.read_text())
    lines = ["| round | tensor | entries each | kept share of ‖x‖², mean (min–max) | a Gaussian's |",
             "|---|---|---:|---:|---:|"]
    for r in range(0, len(uploads), clients):
        by_kind: dict[str, list] = {}
        for upload in uploads[r:r + clients]:
            for kind, n, share in upload:
                by_kind.setdefault(kind, []).append((n, share))
        for kind, got in sorted(by_kind.items()):
            shares = [s for _, s in got]
            lines.append(f"| {r // clients + 1} | {kind} | {got[0][0]:,} | {sum(shares) / len(shares):.2f}"
                         f" ({min(shares):.2f}–{max(shares):.2f}) | {gaussian_share(fraction):.2f} |")
    return "\n".join(lines)


def rows(out: Path) -> list[dict]:
    return read_rows(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/topk"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--job-flags", default="", help="more fedlora-sim flags for every run, e.g. '--lr 0.1'")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one run, in its own process (a patched coding must not outlive it)
        from fedlora.simulations.cli import main as sim
        if args.child in ("global", "head-whole"):
            patch(args.child)
        if args.child == "per-tensor":
            (args.out / args.child).mkdir(parents=True, exist_ok=True)
            record_energy(args.out / args.child / ENERGY)
        return sim([*VARIANTS[args.child], "--num-clients", str(CLIENTS), "--rounds", str(args.rounds),
                    "--quiet", "--overwrite", "--out", str(args.out / args.child),
                    *shlex.split(args.job_flags)])
    names = ["none", *(v for v in args.variants.split(",") if v != "none")]
    for name in names:
        if not (args.out / name / "adapter").is_dir():
            subprocess.run([sys.executable, __file__, "--child", name, "--out", str(args.out), "--rounds",
                            str(args.rounds), "--job-flags", args.job_flags], check=True)
    ref = rows(args.out / "none")
    ref_up = sum(r["bytes_up"] for r in ref)
    print("| variant | test accuracy per round (0 = before) | final vs none (points) | bytes up / none |"
          " compress_error, last round |\n|---|---|---|---|---|")
    for name in names:
        got = rows(args.out / name)
        accs = " / ".join(f"{100 * r['accuracy']:.1f}" for r in got)
        gap = 100 * (got[-1]["accuracy"] - ref[-1]["accuracy"])
        err = got[-1].get("compress_error")
        print(f"| {name} | {accs}% | {gap:+.1f} | {100 * sum(r['bytes_up'] for r in got) / ref_up:.1f}% |"
              f" {'—' if err is None else f'{err:.2f}'} |")
    if (args.out / "per-tensor" / ENERGY).is_file():
        print("\nper-tensor: what the kept entries hold of each coded tensor x = θ − ref + e\n")
        print(energy_table(args.out / "per-tensor" / ENERGY, CLIENTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
