"""Benchmark files scored by ``fedlora-eval`` (and, ``sst2-dpo``, DPO runs): one function per study.

    python benchmarks/llm_eval.py [--studies sst2-mc,bbcnews-mc,sst2-dpo] [--out runs/llm-eval] [--eval-max N]
                                  [--adapter DIR ...] [--dpo-train N] [--dpo-rounds R] [--dpo-steps S]
                                  [--dpo-batch P] [--dpo-sft-weights 0,1] [--dpo-strategies fedavg,flora]
                                  [--job-flags '--precision bf16 --max-clients-per-pass 2']
                                  [--dpo-split] [--dpo-eval-on dev|validation] [--dpo-tag NAME]

* ``sst2-mc`` (:func:`sst2_mc`): SmolLM2-135M-Instruct zero-shot on SST-2's 872 dev sentences as
  multiple choice: choices ``negative`` / ``positive`` (``--label-words``), the prompt of
  ``benchmarks/llm_sft.py`` (:data:`PROMPT`) in SmolLM2's chat template; lm-eval-harness' ``acc``
  and ``acc_norm`` (``mc_accuracy``, ``mc_accuracy_norm``).
* ``bbcnews-mc`` (:func:`bbcnews_mc`): the same on BBC News' held-out split (445 articles of
  ``--data bbcnews-instruct``, ``--seed 0 --test-fraction 0.2``, as every BBC run holds out; each
  prompt holds the article's lead), its five categories as the choices; ``--max-length 256``
  cuts no prompt.
* ``sst2-dpo`` (:func:`sst2_dpo`): federated DPO (``fedlora-sim --task dpo``) from label-word pairs on
  a seeded sample of SST-2 train (``--dpo-train`` phrases: the right word chosen, the other
  rejected), 10 clients, FedAvg and FLoRA (exact, ``--dpo-strategies``), scored on SST-2 dev by
  greedy answer accuracy and reward accuracy; round 0 is the zero-shot model (the reference
  itself). Each strategy runs once per ``--dpo-sft-weights`` α (0: plain DPO; α > 0 adds the
  chosen answer's per-token NLL, as RPO does). ``--dpo-batch`` pairs a step (default 4: the 8 rows
  of a ``benchmarks/llm_sft.py`` step, so that the rounds cost what the SFT job's do, plus the
  reference pass). The reference log-probabilities of every training pair are computed once where
  the job is set up, so the sample is sized to what the rounds draw (10 clients × ``--dpo-steps``
  × ``--dpo-batch`` per round), not to the 67,349 phrases. ``--job-flags`` passes more
  ``fedlora-sim`` flags (precision, pass size, ``--lr``, ``--dpo-beta``; ``--dpo-tag`` names the
  runs' folders apart). ``--model`` and ``--sst2`` let a test run it on a tiny model and files.
  With ``--dpo-split`` the pairs are sampled from the private part of ``benchmarks/llm_sft.py``'s
  split by source sentence (``benchmarks/splits.py``), and ``--dpo-eval-on validation`` scores the
  runs on its validation part (``--eval-max`` of them) instead of dev, for a sweep that reads dev
  once (issue 29's rule). Those runs go to ``OUT/sst2-dpo-split-{dev|validation}/``.

``--adapter`` scores adapters exported by runs on SmolLM2 beside the base. Each study runs
``fedlora-eval`` in this process, into ``OUT/<study>/``, and returns the command it ran and the
result rows; the script prints a Markdown block for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shlex
import sys
import time
from pathlib import Path

from splits import split_file
from stats import read_rows

from fedlora.simulations.cli import main as fedlora_sim
from fedlora.simulations.evaluate import main as fedlora_eval

HERE = Path(__file__).resolve().parent
SST2 = HERE.parents[1] / "shared" / "data" / "sst2"
#: The sentence split of ``--dpo-split``: ``benchmarks/llm_sft.py``'s (``--public-fraction 0.015``),
#: so its validation part is the one the SFT job's choices were made on; the public part goes unused.
SPLIT = {"public": 0.015, "validation": 0.1}


def _llm_sft():
    """``benchmarks/llm_sft.py`` as a module (its prompt is this script's)."""
    spec = importlib.util.spec_from_file_location("llm_sft", HERE / "llm_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LLM_SFT = _llm_sft()
PROMPT = LLM_SFT.PROMPT


def shell(argv: list[str]) -> str:
    """``argv`` as one shell line (a value with a newline as ``$'...'``)."""
    def quote(arg: str) -> str:
        if "\n" in arg:
            return "$'" + arg.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
        return shlex.quote(arg)
    return " ".join(quote(a) for a in argv)


def score(name: str, flags: list[str], args: argparse.Namespace) -> dict:
    """Run ``fedlora-eval`` with ``flags`` (plus ``--adapter``, ``--eval-max``, ``--out``) and return
    ``{"study", "command", "rows", "seconds"}``."""
    out = args.out / name
    argv = [*flags, *(["--eval-max", str(args.eval_max)] if args.eval_max else []),
            *(["--base", "--adapter", *map(str, args.adapter)] if args.adapter else []),
            "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    if fedlora_eval(argv) != 0:
        raise SystemExit(f"{name}: fedlora-eval failed")
    rows = json.loads((out / "eval.json").read_text())["results"]
    return {"study": name, "command": "fedlora-eval " + shell(argv), "rows": rows,
            "seconds": time.perf_counter() - t0}


def sst2_mc(args: argparse.Namespace) -> dict:
    """SST-2 dev as multiple choice (negative / positive), zero-shot."""
    return score("sst2-mc", ["--task", "sft", "--model", "smollm2", "--eval", "mc",
                             "--test-data", str(args.sst2 / "dev.tsv"), "--test-text-column", "content",
                             "--label-words", "0=negative,1=positive", "--prompt-template", PROMPT,
                             "--max-length", "128", "--eval-batch-size", "16"], args)


def bbcnews_mc(args: argparse.Namespace) -> dict:
    """BBC News' held-out split as multiple choice over its five categories, zero-shot."""
    return score("bbcnews-mc", ["--task", "sft", "--model", "smollm2", "--eval", "mc",
                                "--data", "bbcnews-instruct", "--seed", "0", "--test-fraction", "0.2",
                                "--max-length", "256", "--eval-batch-size", "16"], args)


def sample_file(src: Path, n: int, out: Path, seed: int = 0) -> Path:
    """``n`` rows of the table ``src`` (its header kept), drawn from ``seed``, written to ``out``."""
    header, *rows = src.read_text().splitlines()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([header, *random.Random(seed).sample(rows, min(n, len(rows)))]) + "\n")
    return out


def dpo_data(args: argparse.Namespace) -> tuple[Path, list[str], Path]:
    """``(phrases to sample the pairs from, the held-out pairs' flags, the study's folder)``: SST-2's
    whole training file and dev, or with ``--dpo-split`` / ``--dpo-eval-on validation`` the private
    part of ``benchmarks/llm_sft.py``'s sentence split (:data:`SPLIT`) and its dev or validation part."""
    if not args.dpo_split and args.dpo_eval_on == "dev":
        return args.sst2 / "train.tsv", LLM_SFT.held_out_flags(args.sst2), args.out / "sst2-dpo"
    parts = split_file(args.sst2 / "train.tsv", args.out / "data", SPLIT, seed=0)
    return (parts["private"], LLM_SFT.held_out_flags(args.sst2, parts, args.dpo_eval_on),
            args.out / f"sst2-dpo-split-{args.dpo_eval_on}")


def sst2_dpo(args: argparse.Namespace) -> dict:
    """DPO from SST-2 label-word pairs, each of :data:`DPO_STRATEGIES`; rows: round 0 and the last."""
    source, test, root = dpo_data(args)
    train = sample_file(source, args.dpo_train, root / "train.tsv")
    flags = ["--task", "dpo", "--model", args.model, "--data", str(train), "--text-column", "sentence",
             "--label-words", "0=negative,1=positive", "--prompt-template", PROMPT, *test,
             *(["--eval-max", str(args.eval_max)] if args.eval_max else []),
             "--num-clients", "10", "--rounds", str(args.dpo_rounds), "--local-steps", str(args.dpo_steps),
             "--batch-size", str(args.dpo_batch), "--max-length", "96", "--eval-batch-size", "16",
             "--dpo-beta", "0.1", *shlex.split(args.job_flags), "--quiet", "--overwrite"]
    t0, rows = time.perf_counter(), []
    for strategy in args.dpo_strategies.split(","):
        for alpha in args.dpo_sft_weights.split(","):
            out = root / (f"{strategy}-a{alpha}" + (f"-{args.dpo_tag}" if args.dpo_tag else ""))
            if not (out / "adapter").is_dir():  # a finished run is reused
                argv = [*flags, "--strategy", strategy, "--dpo-sft-weight", alpha, "--out", str(out)]
                if fedlora_sim(argv) != 0:
                    raise SystemExit(f"sst2-dpo: fedlora-sim --strategy {strategy} failed")
            got = read_rows(out)
            rows += [{"model": f"{strategy}, α {alpha}, round {r['round']}", **r} for r in (got[0], got[-1])]
    command = "fedlora-sim " + shell([*flags, "--strategy", "S", "--dpo-sft-weight", "α", "--out", "OUT"])
    return {"study": "sst2-dpo", "command": command, "rows": rows, "seconds": time.perf_counter() - t0}


def _cell(value, spec: str, scale: float = 1.0, unit: str = "") -> str:
    """One table cell: ``value`` formatted, or — for a round that was not scored (``--eval-every``)."""
    return "—" if value is None else f"{scale * value:{spec}}{unit}"


def dpo_report(result: dict) -> str:
    """The DPO study as Markdown: the command, then round 0 and the last round of each strategy (— in
    a round that was not scored)."""
    lines = [f"`{result['command']}` ({result['seconds']:.0f} s in all)", "",
             "| run | answer accuracy | reward accuracy | reward margin | DPO loss | examples | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [_cell(r.get("answer_accuracy"), ".1f", 100, "%"),
                 _cell(r.get("reward_accuracy"), ".1f", 100, "%"), _cell(r.get("reward_margin"), ".3f"),
                 _cell(r.get("loss"), ".3f"), str(r.get("eval_examples", "—")),
                 f"{r.get('train_seconds', 0.0):.0f}"]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(result: dict) -> str:
    """One study as Markdown: the command, then a row per model."""
    lines = [f"`{result['command']}` ({result['seconds']:.0f} s in all)", "",
             "| model | acc (mc_accuracy) | acc_norm (mc_accuracy_norm) | loss of the right choice |"
             " examples | eval s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {100 * r['mc_accuracy']:.1f}% | {100 * r['mc_accuracy_norm']:.1f}% |"
                     f" {r['loss']:.3f} | {r['eval_examples']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


#: study -> (what runs it, what reports it)
STUDIES = {"sst2-mc": (sst2_mc, report), "bbcnews-mc": (bbcnews_mc, report),
           "sst2-dpo": (sst2_dpo, dpo_report)}
#: The DPO study's strategies: the default, and an exact one (FLoRA: stacking, folded into the base).
DPO_STRATEGIES = "fedavg,flora"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", default="sst2-mc,bbcnews-mc",
                   help=f"comma-separated: {', '.join(STUDIES)} (sst2-dpo trains: CPU-hours on SmolLM2)")
    p.add_argument("--out", type=Path, default=Path("runs/llm-eval"))
    p.add_argument("--sst2", type=Path, default=SST2, help="folder of SST-2's dev.tsv (and train.tsv)")
    p.add_argument("--eval-max", type=int, default=0, help="score at most N examples per study (0: all)")
    p.add_argument("--adapter", type=Path, nargs="+", default=[], help="adapters to score beside the base")
    p.add_argument("--model", default="smollm2", help="sst2-dpo: the base model")
    p.add_argument("--dpo-train", type=int, default=2000, help="sst2-dpo: SST-2 training phrases sampled")
    p.add_argument("--dpo-rounds", type=int, default=2, help="sst2-dpo: rounds")
    p.add_argument("--dpo-steps", type=int, default=10, help="sst2-dpo: local steps per round")
    p.add_argument("--dpo-batch", type=int, default=4, help="sst2-dpo: pairs per local step")
    p.add_argument("--dpo-sft-weights", default="0,1", help="sst2-dpo: comma list of --dpo-sft-weight α")
    p.add_argument("--dpo-strategies", default=DPO_STRATEGIES, help="sst2-dpo: comma list of strategies")
    p.add_argument("--job-flags", default="", help="sst2-dpo: more fedlora-sim flags")
    p.add_argument("--dpo-tag", default="", help="sst2-dpo: suffix of the runs' folders (with --job-flags)")
    p.add_argument("--dpo-split", action="store_true",
                   help="sst2-dpo: sample the pairs from the private part of the sentence split")
    p.add_argument("--dpo-eval-on", choices=("dev", "validation"), default="dev",
                   help="sst2-dpo: score on dev or on the split's validation part (implies --dpo-split)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.studies.split(",") if n.strip()]
    unknown = sorted(set(names) - set(STUDIES))
    if unknown:
        p.error(f"unknown studies {unknown}; choose from {', '.join(STUDIES)}")
    for name in names:
        run, table = STUDIES[name]
        print(f"### {name}\n\n{table(run(args))}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
