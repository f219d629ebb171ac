"""Accuracy against ε with sample-level DP-SGD on SST-2, and the sweep behind the DP defaults.

Job (every run): MiniLM, SST-2's 67,349 training phrases (``../shared/data/sst2/train.tsv``)
split IID over ``--clients`` clients (13k+ each at 5), evaluated on the 872 dev sentences
(``dev.tsv``), ``--max-length 32`` with dynamic padding, batch ``--batch-size`` (≥ 256, Poisson
under DP: q_k = batch / n_k), ``--rounds`` × ``--local-steps`` steps per client, δ = 1e-5.

* ``table`` (default): for each strategy (fedavg, ffa-lora, fed-sb) and ε ∈ {1, 3, 8, ∞} (∞: the
  same job without DP), the final and best dev accuracy, σ, q, the steps each client took and
  the ε every client ended at. With ``--seeds 0,1,2`` every run is repeated per seed (the
  clients' draws, the adapters' start, the noise; the split stays ``--split-seed``'s) in
  ``OUT/<strategy>-eps<ε>/seed<k>/``, and a second table gives the final accuracy as mean ± sd
  and its paired difference from the same seeds' ε = ∞ runs (``stats.difference``).
* ``--sweep``: FFA-LoRA at ε = 8 over learning rates × clipping norms (and head options),
  fewer rounds: the source of the ``--dp sample`` defaults (``fedlora.job.defaults.DP_RECIPE``).
* ``--client-level``: ``--dp client`` (the server clips and noises each client's update) with
  ``--clients`` clients (e.g. 100) and ``--per-round`` of them per round, at ε = 8 and without DP.
* ``--snr``: each strategy's ε = 8 job at its start (after its initialisation): per-example
  gradient norms, the mean clipped gradient's norm and one step's noise ``σ C / B · √D``.
* ``--clip-study``: client 0 alone from that start, DP-SGD under several clips and noise levels
  (``--study-settings``, e.g. clipping without noise): loss and dev accuracy every 20 steps.

Data (``benchmarks/splits.py``, by source sentence, so no part holds a piece of another's
sentence): ``--validation-fraction`` of SST-2's training sentences (default 0.1) are a validation
part, and with ``--public-fraction F`` (0.015: about 950 phrases) a public part that every run
uses for its head (``--head public``) and Fed-SB for its initialisation (``--init-data``), at no ε;
the clients split the rest. Runs are scored on ``--eval-on``: ``validation`` (the default of
``--sweep``, ``--clip-study``, ``--snr``: every choice is made there) or ``dev`` (the default of the
final table; read once). With ``--job-flags '--public-steps 40'`` the server also warm-starts
the adapters on it before round 1 (the runs' start; FedAvg at ε = 8 then ends 3.2 points under
its non-private job, RESULTS.md).

Each run is one ``fedlora-sim`` job in ``OUT/<run>/``; finished runs are reused, so an
interrupted table resumes, and ``--report-only`` rebuilds the table. ``--quick`` is a smoke run
(1 round of 2 steps of 32 examples). Cost on a 2-core CPU: printed per run (``wall s``).

Usage::

    python benchmarks/dp_learning.py --out runs/dp_learning
    python benchmarks/dp_learning.py --out runs/dp_sweep --sweep
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from splits import split_file
from stats import difference, mean_sd, read_rows

ROOT = Path(__file__).resolve().parents[1]
EPSILONS = ("1", "3", "8", "inf")


def job(args: argparse.Namespace, strategy: str, epsilon: str, out: Path, extra=()) -> list[str]:
    """The ``fedlora-sim`` flags of one run."""
    test, column = ((args.validation_file, "sentence") if args.eval_on == "validation"
                    else (Path(args.data_dir) / "dev.tsv", "content"))
    flags = ["--data", str(args.train_file), "--text-column", "sentence", "--test-data",
             str(test), "--test-text-column", column, "--num-clients", str(args.clients),
             "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--batch-size",
             str(args.batch_size), "--max-length", str(args.max_length), "--strategy", strategy,
             "--seed", str(args.seed), "--out", str(out), "--quiet", "--overwrite",
             "--eval-batch-size", "256"]
    if epsilon != "inf":
        flags += ["--dp", "sample", "--epsilon", epsilon, "--delta", "1e-5", "--dp-backend", "fedlora"]
    if args.public_file:  # the same in every run, private or not
        flags += ["--init-data", str(args.public_file), "--head", "public"]
    return [*flags, *extra]


def data_split(args: argparse.Namespace) -> tuple[Path, Path | None, Path]:
    """``(private file, public file or None, validation file)``: SST-2's training phrases split by
    source sentence (:func:`splits.split_file`, seeded by ``--split-seed``)."""
    fractions = {"public": args.public_fraction, "validation": args.validation_fraction}
    paths = split_file(Path(args.data_dir) / "train.tsv", Path(args.out) / "data", fractions, args.split_seed)
    return paths["private"], paths["public"] if args.public_fraction else None, paths["validation"]


def run(args: argparse.Namespace, name: str, flags: list[str]) -> dict | None:
    """Run one job unless its metrics exist; the summary of its rows (None if it did not run)."""
    from fedlora.simulations.cli import main as sim

    out = Path(args.out) / name
    metrics = out / "metrics.jsonl"
    if not (metrics.is_file() and (out / "adapter").is_dir()) and not args.report_only:
        t0 = time.perf_counter()
        if sim(flags) != 0:
            raise SystemExit(f"run {name} failed")
        (out / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    if not metrics.is_file():
        return None
    rows = read_rows(out)
    cfg = json.loads((out / "config.json").read_text())
    last = rows[-1]
    wall = json.loads((out / "wall.json").read_text())["seconds"] if (out / "wall.json").is_file() else None
    return {"final": last["accuracy"], "best": max(r["accuracy"] for r in rows[1:]),
            "sigma": last.get("noise_multiplier"), "eps": last.get("epsilon_per_client"),
            "steps": cfg["rounds"] * cfg["local_steps"], "wall": wall, "lr": cfg["lr"],
            "clip": cfg["max_grad_norm"] or last.get("max_grad_norm"),  # given, or measured (public file)
            "rounds": len(rows) - 1}


def fmt(s: dict | None, eps: str, q: float) -> str:
    if s is None:
        return "| (not run) |"
    spent = "—" if not s["eps"] else f"{min(s['eps']):.2f}–{max(s['eps']):.2f}"
    sigma = "—" if s["sigma"] is None else f"{s['sigma']:.3f}"
    wall = "—" if s["wall"] is None else f"{s['wall']:.0f}"
    clip = "—" if s["clip"] is None else f"{s['clip']:.3g}"
    return (f"{s['final']:.1%} | {s['best']:.1%} | {sigma} | {q if eps != 'inf' else 1:.4f} | {s['steps']} |"
            f" {spent} | {s['lr']:g} | {clip} | {wall} |")


def sizes(args: argparse.Namespace) -> float:
    """q of a client of the IID split (all clients within one example of each other)."""
    n = sum(1 for _ in open(args.train_file)) - 1
    return min(1.0, args.batch_size / (n // args.clients))


def table(args: argparse.Namespace) -> int:
    q = sizes(args)
    seeds = [int(k) for k in args.seeds.split(",")] if args.seeds else [args.seed]
    lines = ["| strategy | ε | seed | final acc | best acc | σ | q | steps / client | ε spent (clients) |"
             " lr | clip | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    finals: dict[tuple[str, str], list[float]] = {}
    for strategy in args.strategies.split(","):
        for eps in args.epsilons.split(","):
            extra = [*args.job_flags, *([] if eps == "inf" else args.dp_flags)]
            for seed in seeds:
                local = argparse.Namespace(**{**vars(args), "seed": seed})
                name = f"{strategy}-eps{eps}" + (f"/seed{seed}" if args.seeds else "")
                s = run(local, name, job(local, strategy, eps, Path(args.out) / name, extra))
                if s is not None:
                    finals.setdefault((strategy, eps), []).append(s["final"])
                lines.append(f"| {strategy} | {eps} | {seed} | {fmt(s, eps, q)}")
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    if len(seeds) > 1:
        print("\n" + "\n".join(seed_summary(finals, len(seeds))))
    return 0


def seed_summary(finals: dict[tuple[str, str], list[float]], seeds: int) -> list[str]:
    """Per strategy and ε: the final accuracy over seeds (mean ± sd) and its paired difference
    from ε = ∞ ("—" unless both have every seed)."""
    lines = ["| strategy | ε | seeds run | final acc | vs no DP (paired) |", "|---|---|---|---|---|"]
    for (strategy, eps), values in finals.items():
        base = finals.get((strategy, "inf"), [])
        vs = difference(values, base) if eps != "inf" and len(values) == len(base) == seeds else "—"
        lines.append(f"| {strategy} | {eps} | {len(values)} | {mean_sd(values)} | {vs} |")
    return lines


def sweep(args: argparse.Namespace) -> int:
    q = sizes(args)
    lines = ["| strategy | ε | settings | final acc | best acc | σ | q | steps / client | ε spent | lr |"
             " clip | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fixed = " ".join(args.dp_flags)
    grid = [([*args.dp_flags, "--lr", lr, "--max-grad-norm", clip], f"lr {lr}, clip {clip}")
            for lr in args.sweep_lrs.split(",") for clip in args.sweep_clips.split(",")]
    grid += [([*args.dp_flags, "--head", head], f"head {head}")
             for head in args.sweep_heads.split(",") if head]
    for flags, label in grid:
        label = f"{label}, {fixed}" if fixed else label
        name = "sweep-" + label.replace(", ", "-").replace(" ", "")
        s = run(args, name, job(args, "ffa-lora", "8", Path(args.out) / name, flags))
        lines.append(f"| ffa-lora | 8 | {label} | {fmt(s, '8', q)}")
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


def client_level(args: argparse.Namespace) -> int:
    """``--dp client`` at 100 clients, ``--per-round`` sampled each round: the sum-only strategies
    at ε = 8 (and ∞) on the same SST-2 split (673 phrases a client), ordinary local training."""
    lines = ["| strategy | ε | clients / round | rounds | final acc | best acc | σ | clipped (last round) |"
             " wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for strategy in args.strategies.split(","):
        for eps in ("8", "inf"):
            name = f"client-{strategy}-eps{eps}"
            flags = job(args, strategy, "inf", Path(args.out) / name)
            flags += ["--clients-per-round", str(args.per_round)]
            if eps != "inf":
                flags += ["--dp", "client", "--epsilon", eps, "--delta", "1e-3", "--update-clip",
                          str(args.update_clip)]
            s = run(args, name, flags)
            if s is None:
                lines.append(f"| {strategy} | {eps} | (not run) |")
                continue
            rows = read_rows(Path(args.out) / name)
            clipped = rows[-1].get("clipped_fraction")
            lines.append(f"| {strategy} | {eps} | {args.per_round} | {s['rounds']} | {s['final']:.1%} |"
                         f" {s['best']:.1%} | {rows[-1].get('noise_multiplier') or '—'} |"
                         f" {'—' if clipped is None else f'{clipped:.0%}'} | {s['wall'] or 0:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


def norms(args: argparse.Namespace) -> int:
    """Per-example gradient norms at the start of training (64 SST-2 phrases, fedavg's fresh
    adapter, Fed-SB's frozen factors drawn at random): their quantiles and the head's share."""
    import torch

    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import build_model
    from fedlora.privacy.dpsgd import Capture, grad_samples
    from fedlora.strategies import strategy_class
    from fedlora.tasks import get_task

    for strategy in args.strategies.split(","):
        cfg = JobConfig(strategy=strategy, data=str(Path(args.data_dir) / "train.tsv"),
                        text_column="sentence", max_length=args.max_length, seed=args.seed)
        plan = strategy_class(strategy).from_job(cfg).plan(1)
        fm, tokenizer, _ = build_model(cfg, [cfg.rank], plan, 2)
        if plan.core:
            for layer in fm.adapters.values():
                layer.sb_A.normal_(0, 0.05)
                layer.sb_B.normal_(0, 0.05)
        else:
            fm.reset_adapters(args.seed)
        task = get_task("classification")
        data = task.encode(tokenizer, task.load(cfg.data, cfg).subset(list(range(64))), cfg)
        labels = data.pop("labels")
        with Capture(fm.client_layers()) as cap:
            task.row_losses(fm(**data).logits, labels).sum().backward()
        heads = {id(p) for h in fm.heads.values() for p in h.parameters()}
        rows = grad_samples(fm, cap, torch.zeros(64, dtype=torch.long))
        sq = {id(p): g.reshape(64, -1).pow(2).sum(1) for p, g in rows}
        total = sum(sq.values())
        head = sum(v for k, v in sq.items() if k in heads)
        q = torch.quantile(total.sqrt(), torch.tensor([0.1, 0.5, 0.9])).tolist()
        print(f"{strategy}: per-example norm 10/50/90% {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f};"
              f" head share of the squared norm {float((head / total).mean()):.2%}")
    return 0


def started(args: argparse.Namespace, strategy: str):
    """``(job, coordinator)``: the strategy's ε = 8 job of the table (its flags), built and past its
    initialisation (e.g. the public start), as ``fedlora-sim`` would run it."""
    from fedlora.rounds.coordinator import Coordinator
    from fedlora.rounds.loop import Phases
    from fedlora.simulations.batched import BatchedTransport
    from fedlora.simulations.cli import build_parser, check_args
    from fedlora.simulations.engine import build_job

    flags = job(args, strategy, "8", Path(args.out) / f"start-{strategy}", [*args.job_flags, *args.dp_flags])
    cfg = check_args(build_parser().parse_args(flags))
    built = build_job(cfg)
    coord = Coordinator(cfg, built.strategy, built.fm, built.test, built.public)
    coord.start(Phases(BatchedTransport(built, coord), cfg.sampled(0)))
    return built, coord


def snr(args: argparse.Namespace) -> int:
    """Signal against noise at the start of each strategy's ε = 8 job (the table's flags, after
    its initialisation, e.g. the public start): per-example gradient norms of the trainable
    tensors over 512 of client 0's phrases, the norm of their mean clipped at the job's C, and
    the norm of one step's noise on that mean, ``σ C / B · √D`` (σ: the job's calibrated one)."""
    import torch

    from fedlora.kernels import Routing
    from fedlora.privacy.dpsgd import Capture, clip_factors, grad_samples
    from fedlora.tasks import gather_rows

    for strategy in args.strategies.split(","):
        built, coord = started(args, strategy)
        cfg = built.cfg
        rows = built.samplers[0].indices[:512].tolist()
        batch = gather_rows(built.train, rows, torch.device("cpu"))
        labels = batch.pop("labels")
        ids = torch.zeros(len(rows), dtype=torch.long)
        with Capture(built.fm.client_layers()) as cap:
            out = built.fm(routing=Routing.from_ids(ids), **batch)
            built.task.row_losses(out.logits, labels).sum().backward()
        flat = torch.cat([g.reshape(len(rows), -1) for _, g in grad_samples(built.fm, cap, ids)], dim=1)
        norms_ = flat.norm(dim=1)                                                    # (512,)
        C, sigma = cfg.max_grad_norm or coord.clip, built.budgets[0].sigma
        mean = (flat * clip_factors(norms_.pow(2), None, C)[:, None]).mean(dim=0)
        noise = sigma * C / cfg.batch_size * flat.shape[1] ** 0.5
        q = torch.quantile(norms_, torch.tensor([0.1, 0.5, 0.9])).tolist()
        print(f"{strategy}: D = {flat.shape[1]} noisy numbers; per-example norm 10/50/90%"
              f" {q[0]:.3g} / {q[1]:.3g} / {q[2]:.3g}; C = {C:g}: mean clipped gradient {mean.norm():.4f},"
              f" noise per step {noise:.4f} (σ = {sigma:.3f}, B = {cfg.batch_size}),"
              f" ratio {mean.norm() / noise:.2f}", flush=True)
    return 0


def study_run(built, tc, C: float, sigma: float, steps: int, schedule: str = "constant") -> list[str]:
    """``steps`` DP-SGD steps of client 0 (slot 0) clipped at ``C`` with noise ``σ C``, the job's
    optimizer and lr (``schedule="linear"``: decayed linearly to 0 over the steps); ``"loss /
    accuracy"`` every 20 steps."""
    import torch

    from fedlora.privacy.dpsgd import (
        clipped_sums,
        noise_generator,
        noisy_mean,
        pass_sums,
        poisson_batches,
    )
    from fedlora.training.optim import make_optimizer

    fm, sampler, batch = built.fm, built.samplers[0], built.cfg.batch_size
    sampler.start_round(1)
    opt = make_optimizer(fm.trainable_parameters(), tc)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps if schedule == "linear" else 1.0)
    losses, line = [], []
    fm.train()
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        packed = poisson_batches([sampler], [batch / len(sampler)])
        sums, loss = pass_sums(fm, built.train, packed, tc, torch.device("cpu"),
                               lambda dpp: clipped_sums(fm, dpp, C))
        gen = [noise_generator(sampler.seed, 1, step, reproducible=False)]
        for p, summed in sums.items():
            p.grad = torch.zeros_like(p)
            p.grad[:1] = noisy_mean(summed, torch.tensor([sigma]), C, torch.tensor([float(batch)]), gen)
        opt.step()
        decay.step()
        losses.append(float(loss[0]) / max(1, int(packed.counts[0])))
        if step % 20 == 0:
            fm.eval()
            acc = built.task.evaluate(fm, built.test, built.cfg)["accuracy"]
            fm.train()
            line.append(f"{sum(losses[-20:]) / 20:.3f} / {acc:.1%}")
    fm.eval()
    return line


def clip_study(args: argparse.Namespace) -> int:
    """Client 0 alone, from each strategy's ε = 8 start (as ``--snr``), ``--study-steps`` DP-SGD
    steps under each ``C:σ`` of ``--study-settings`` (C: a number, ``inf`` for no clipping, ``job``
    for the job's clip; σ: a number, or ``job`` for the job's calibrated one): the training loss
    and dev accuracy every 20 steps. Separates what the clip does from what the noise does."""
    from fedlora.training.train import TrainConfig

    for strategy in args.strategies.split(","):
        built, coord = started(args, strategy)
        tc = TrainConfig.from_job(built.cfg, clip=coord.clip)
        start = {k: t.detach().clone() for k, t in built.fm.state_dict().items()}
        print(f"{strategy}: start {built.task.evaluate(built.fm, built.test, built.cfg)['accuracy']:.1%},"
              f" job clip {tc.max_grad_norm:.3g}", flush=True)
        for setting in args.study_settings.split(","):
            c_text, s_text = setting.split(":")
            C = {"inf": 1e6, "job": tc.max_grad_norm}.get(c_text) or float(c_text)  # 1e6: above every norm
            sigma = 0.0 if c_text == "inf" else built.budgets[0].sigma if s_text == "job" else float(s_text)
            built.fm.load_state_dict(start)
            line = study_run(built, tc, C, sigma, args.study_steps, args.study_schedule)
            print(f"{strategy} C={c_text} ({C:.3g}) σ={sigma:.3f}: loss / acc every 20 steps: "
                  + ", ".join(line), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dp_learning")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="", help="the table over these seeds (e.g. 0,1,2), mean ± sd")
    p.add_argument("--strategies", default="fedavg,ffa-lora,fed-sb")
    p.add_argument("--epsilons", default=",".join(EPSILONS))
    p.add_argument("--dp-flags", default="", help="extra flags for the DP runs (e.g. '--lr 5e-3')")
    p.add_argument("--job-flags", default="", help="extra flags for every run (e.g. '--head frozen')")
    p.add_argument("--sweep", action="store_true", help="the DP-defaults sweep instead of the table")
    p.add_argument("--sweep-lrs", default="1e-3,5e-3,2e-2")
    p.add_argument("--sweep-clips", default="0.1,1.0")
    p.add_argument("--sweep-heads", default="", help="e.g. zero,frozen (with --dp-flags of the best)")
    p.add_argument("--client-level", action="store_true",
                   help="--dp client at --clients clients (use 100), --per-round per round, batch 8")
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--update-clip", type=float, default=0.5)
    p.add_argument("--norms", action="store_true", help="per-example gradient norms at the start")
    p.add_argument("--snr", action="store_true",
                   help="each strategy's ε = 8 job at its start: per-example norms, the mean clipped"
                        " gradient against one step's noise")
    p.add_argument("--clip-study", action="store_true",
                   help="client 0 alone from each strategy's ε = 8 start, under --study-settings")
    p.add_argument("--study-settings", default="inf:0,0.1:0,0.1:job,job:0,job:job")
    p.add_argument("--study-steps", type=int, default=60)
    p.add_argument("--study-schedule", choices=("constant", "linear"), default="constant",
                   help="the study's lr over its steps: constant, or linear decay to 0")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 round of 2 steps of 32 examples (smoke)")
    p.add_argument("--public-fraction", type=float, default=0.0,
                   help="this fraction of the training sentences (with their phrases) is public: every"
                        " run trains its head on it (--head public), Fed-SB initialises from it, no ε")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--eval-on", choices=("validation", "dev"), default=None,
                   help="score on the validation part (default for --sweep and the studies) or dev")
    args = p.parse_args(argv)
    args.dp_flags, args.job_flags = args.dp_flags.split(), args.job_flags.split()
    if args.quick:
        args.rounds, args.local_steps, args.batch_size = 1, 2, 32
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (Path(args.data_dir) / "train.tsv").is_file():
        print(f"dp_learning: no SST-2 at {args.data_dir} (pass --data-dir)", file=sys.stderr)
        return 2
    args.train_file, args.public_file, args.validation_file = data_split(args)
    choosing = args.sweep or args.clip_study or args.snr or args.norms
    args.eval_on = args.eval_on or ("validation" if choosing else "dev")
    if args.norms:
        return norms(args)
    if args.snr:
        return snr(args)
    if args.clip_study:
        return clip_study(args)
    if args.client_level:
        return client_level(args)
    return sweep(args) if args.sweep else table(args)


if __name__ == "__main__":
    sys.exit(main())
