"""What a 4-bit base loses before any adapter trains, and what a frozen low-rank correction restores.

    python benchmarks/quant_error.py [--rows 200] [--ranks 8,32] [--threads 2]
    python benchmarks/quant_error.py --sensitivity [--kl-rows 50]   # which layers the KL comes from
    python benchmarks/quant_error.py --write-base nf4-aw8 runs/smollm2-nf4-aw8  # a base for --model

SmolLM2-135M-Instruct's linear layers (every ``nn.Linear`` but the tied LM head, as ``--quantize``
replaces them) are rounded to a code and decoded back to float32, then the model answers SST-2
rows zero-shot. Each variant is scored by its label logits: accuracy of ``argmax`` over the first
tokens of "negative" and "positive" at the answer's first position, and the mean negative log
likelihood of the right one; and by the mean KL divergence of its next-token distribution from
the uncoded model's, over every position of the first ``--kl-rows`` prompts (the damage itself,
whatever the task). The rows come from the validation part of the sentence-disjoint
split (``benchmarks/splits.py``, as ``benchmarks/llm_sft.py --eval-on validation``), the ones of 8
or more words, so dev is not read. The prompt is ``llm_sft.py``'s, rendered with the model's chat
template.

Codes: bitsandbytes' own ``quantize_4bit`` / ``dequantize_4bit`` (NF4 and FP4, absmax blocks of
64, what ``--quantize nf4|fp4`` loads; NF4 with blocks of 32 and 128 too) and a row-wise absmax
int8 (``round(127 w / max|w_row|)``: LLM.int8's coding without its outlier columns). The
correction variants add to NF4 the best rank-``r`` approximation of its error ``E = W − Q(W)``
(LQER, Zhang et al. 2024): plainly (``SVD_r(E)``), and weighted by each input channel's mean
``|x|`` on 32 other validation prompts (``SVD_r(E S) S⁻¹``, ``S = diag(mean |x|)``: the error on
typical inputs rather than on every input alike).

Prints a Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from llm_sft import PROMPT, SST2
from splits import split_file
from torch import Tensor

from fedlora.models.correction import correction_factors
from fedlora.models.hub import resolve_model_path

Weights = dict[str, Tensor]


def validation_rows(out: Path, n: int, calibration: int, seed: int = 0, part: str = "validation"
                    ) -> tuple[list, list]:
    """``n`` scored rows and ``calibration`` other rows of 8+ words from one part of SST-2's split
    (``llm_sft.py --eval-on validation``'s: no public part, 10% validation, seed 0)."""
    parts = split_file(SST2 / "train.tsv", out, {"public": 0.0, "validation": 0.1}, seed=0)
    with parts[part].open() as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if len(r["sentence"].split()) >= 8]
    random.Random(seed).shuffle(rows)
    return rows[:n], rows[n:n + calibration]


def write_base(model, tok, weights: Weights, scales: Weights, kind: str, folder: Path) -> None:
    """Save SmolLM2 with its coded weights (``nf4``, or ``nf4-awR``: NF4 plus the activation-weighted
    rank-R correction, merged) as a model folder that ``--model`` takes: the accuracy a 4-bit base
    (and its correction) costs an SFT job, on a bf16 base that holds the decoded values."""
    if kind == "nf4":
        coded = {n: four_bit(w, "nf4", 64) for n, w in weights.items()}
    elif kind.startswith("nf4-aw") and kind[6:].isdigit():
        rank = int(kind[6:])
        coded = {n: corrected(w, four_bit(w, "nf4", 64), rank, scales[n]) for n, w in weights.items()}
    else:
        raise SystemExit(f"--write-base {kind}: use nf4 or nf4-awR (R the correction's rank)")
    load(model, coded)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    load(model, weights)


def linear_weights(model) -> Weights:
    """Every quantizable linear layer's float32 weight (the tied LM head is left alone)."""
    return {name: m.weight.detach().clone() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}


def load(model, weights: Weights) -> None:
    for name, m in model.named_modules():
        if name in weights:
            m.weight.data.copy_(weights[name])


def four_bit(w: Tensor, kind: str, block: int) -> Tensor:
    """``w`` through bitsandbytes' 4-bit code (``nf4``/``fp4``, absmax blocks of ``block``) and back."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w.contiguous(), quant_type=kind, blocksize=block)
    return bnbf.dequantize_4bit(q, state).float()


def int8_rows(w: Tensor) -> Tensor:
    """Row-wise absmax int8, decoded."""
    s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return (w / s).round().clamp(-127, 127) * s


def corrected(w: Tensor, q: Tensor, rank: int, scale: Tensor | None = None) -> Tensor:
    """``q`` plus the best rank-``rank`` approximation of ``w − q`` (weighted by ``scale`` per input):
    ``--quant-correction``'s own factors (:func:`fedlora.models.correction.correction_factors`)."""
    U, V = correction_factors(w - q, rank, scale)                       # (d_out, r), (r, d_in)
    return q + U @ V


def input_scales(model, batches: list[dict], names: set[str]) -> Weights:
    """Mean ``|x|`` per input channel of each named linear layer over ``batches``."""
    sums: Weights = {}
    counts: dict[str, int] = {}

    def hook(module, inputs, output, name):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs()
        sums[name] = sums.get(name, 0) + x.sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
               for n, m in model.named_modules() if n in names]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def log_probs(model, batch: dict) -> Tensor:
    """``(T, V)`` next-token log-probabilities of one prompt, under bf16 autocast."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.log_softmax(model(**batch).logits[0].float(), dim=-1)


def score(model, batches: list[dict], labels: list[int], label_ids: list[int]) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall of the two labels) and the mean NLL of the right
    label's token, by the label logits at the answer's first position."""
    hits, nll = [], 0.0
    for batch, y in zip(batches, labels, strict=True):
        lp = log_probs(model, batch)[-1]                                       # (V,)
        hits.append(int(lp[label_ids].argmax().item() == y))
        nll -= lp[label_ids[y]].item()
    recall = [sum(h for h, y in zip(hits, labels, strict=True) if y == c) / max(1, labels.count(c))
              for c in (0, 1)]
    return {"accuracy": sum(hits) / len(hits), "balanced": sum(recall) / 2, "nll": nll / len(hits)}


def mean_kl(model, batches: list[dict], reference: list[Tensor]) -> float:
    """Mean over every position of ``batches`` of ``KL(reference ‖ model)`` in nats per token."""
    total, tokens = 0.0, 0
    for batch, ref in zip(batches, reference, strict=True):
        lp = log_probs(model, batch)                                           # (T, V)
        total += (ref.float().exp() * (ref.float() - lp)).sum().item()
        tokens += lp.shape[0]
    return total / tokens


def variants(ranks: list[int], scales: Weights) -> dict[str, Callable[[str, Tensor], Tensor]]:
    nf4 = {}

    def nf4_of(name: str, w: Tensor) -> Tensor:
        if name not in nf4:
            nf4[name] = four_bit(w, "nf4", 64)
        return nf4[name]

    out: dict[str, Callable[[str, Tensor], Tensor]] = {
        "none (bf16 compute)": lambda n, w: w,
        "nf4, blocks of 64 (--quantize nf4)": nf4_of,
        "nf4, blocks of 32": lambda n, w: four_bit(w, "nf4", 32),
        "nf4, blocks of 128": lambda n, w: four_bit(w, "nf4", 128),
        "fp4, blocks of 64 (--quantize fp4)": lambda n, w: four_bit(w, "fp4", 64),
        "int8, row-wise absmax": lambda n, w: int8_rows(w),
    }
    for r in ranks:
        out[f"nf4 + rank-{r} SVD of its error"] = lambda n, w, r=r: corrected(w, nf4_of(n, w), r)
        out[f"nf4 + rank-{r} activation-weighted SVD"] = (
            lambda n, w, r=r: corrected(w, nf4_of(n, w), r, scales[n]))
    return out


def groups(names: list[str]) -> dict[str, list[str]]:
    """The coded layers by projection type (``q_proj``, …) and by block (``block 0``, …)."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(n.rsplit(".", 1)[-1], []).append(n)
    for n in names:
        block = next((p for p in n.split(".") if p.isdigit()), None)
        if block is not None:
            out.setdefault(f"block {block}", []).append(n)
    return out


def sensitivity(model, weights: Weights, batches: list[dict], reference: list[Tensor]) -> None:
    """KL from the uncoded model with only one group of layers in NF4 (blocks of 64), group by group."""
    print("| only these layers in nf4 | layers | KL, nats / token |\n|---|---:|---:|")
    for name, members in groups(list(weights)).items():
        load(model, {**weights, **{n: four_bit(weights[n], "nf4", 64) for n in members}})
        print(f"| {name} | {len(members)} | {mean_kl(model, batches, reference):.4f} |", flush=True)
    load(model, weights)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200, help="validation rows scored")
    p.add_argument("--ranks", default="8,32", help="ranks of the error corrections")
    p.add_argument("--kl-rows", type=int, default=50, help="prompts the KL is taken over")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-base", nargs=2, metavar=("KIND", "FOLDER"),
                   help="instead: save SmolLM2 coded as KIND (nf4, nf4-awR) to FOLDER, for --model")
    p.add_argument("--sensitivity", action="store_true",
                   help="instead: the KL with one group of layers (a projection type, a block) in nf4")
    p.add_argument("--out", type=Path, default=Path("runs/quant-error"), help="where the split is written")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()

    def encode(r: dict) -> dict:
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT.format(text=r["sentence"])}],
                                       tokenize=False, add_generation_prompt=True)
        return dict(tok(text, return_tensors="pt", add_special_tokens=False))

    weights = linear_weights(model)
    if args.write_base:  # calibrated on the clients' part of the split, not on the rows it is scored on
        _, private = validation_rows(args.out, 0, 32, part="private")
        scales = input_scales(model, [encode(r) for r in private], set(weights))
        write_base(model, tok, weights, scales, args.write_base[0], Path(args.write_base[1]))
        print(f"wrote {args.write_base[0]} SmolLM2 to {args.write_base[1]}")
        return 0
    rows, calibration = validation_rows(args.out, args.rows, 32)
    batches, labels = [encode(r) for r in rows], [int(r["label"]) for r in rows]
    label_ids = [tok.encode(w, add_special_tokens=False)[0] for w in ("negative", "positive")]
    scales = input_scales(model, [encode(r) for r in calibration], set(weights))
    kl_batches = batches[:args.kl_rows]
    reference = [log_probs(model, b).to(torch.bfloat16) for b in kl_batches]   # the uncoded model's
    if args.sensitivity:
        print(f"SmolLM2-135M-Instruct, KL from the uncoded model over every token of {len(kl_batches)}"
              f" SST-2 validation prompts; torch {torch.__version__}, threads {args.threads}")
        sensitivity(model, weights, kl_batches, reference)
        return 0
    print(f"SmolLM2-135M-Instruct, zero-shot, {len(rows)} SST-2 validation rows of 8+ words"
          f" ({100 * sum(labels) / len(labels):.0f}% positive), label logits; KL from the uncoded model over"
          f" every token of the first {len(kl_batches)} prompts; {len(weights)} linear layers coded; torch"
          f" {torch.__version__}, threads {args.threads}")
    print("| base weights | accuracy | balanced accuracy | NLL of the right label | KL, nats / token |\n"
          "|---|---:|---:|---:|---:|")
    for name, code in variants([int(r) for r in args.ranks.split(",")], scales).items():
        load(model, {n: code(n, w) for n, w in weights.items()})
        got = score(model, batches, labels, label_ids)
        print(f"| {name} | {100 * got['accuracy']:.1f}% | {100 * got['balanced']:.1f}% | {got['nll']:.3f} |"
              f" {mean_kl(model, kl_batches, reference):.4f} |", flush=True)
    load(model, weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
