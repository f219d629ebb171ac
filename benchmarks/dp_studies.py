"""The studies behind ``benchmarks/dp_learning.py``'s DP defaults, run through its flags.

* :func:`norms` (``--norms``): per-example gradient norms at a fresh start and the head's share.
* :func:`snr` (``--snr``): each strategy's ε = 8 job at its start, the mean clipped gradient
  against one step's noise ``σ C / B · √D``.
* :func:`clip_study` (``--clip-study``): client 0 alone from that start, DP-SGD under several
  clips and noise levels, loss and accuracy every 20 steps.

The ε = 8 job of a strategy comes from ``dp_learning.py`` as its ``fedlora-sim`` flags
(``flags_of(strategy)``), so a study starts exactly where that job's table run starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

Flags = Callable[[str], list[str]]


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


def started(flags: list[str]):
    """``(job, coordinator)``: the job of these ``fedlora-sim`` flags, built and past its
    initialisation (e.g. the public start), as ``fedlora-sim`` would run it."""
    from fedlora.rounds.coordinator import Coordinator
    from fedlora.rounds.loop import Phases
    from fedlora.simulations.batched import BatchedTransport
    from fedlora.simulations.cli import build_parser, check_args
    from fedlora.simulations.engine import build_job

    cfg = check_args(build_parser().parse_args(flags))
    built = build_job(cfg)
    coord = Coordinator(cfg, built.strategy, built.fm, built.test, built.public)
    coord.start(Phases(BatchedTransport(built, coord), cfg.sampled(0)))
    return built, coord


def snr(args: argparse.Namespace, flags_of: Flags) -> int:
    """Signal against noise at the start of each strategy's ε = 8 job (the table's flags, after
    its initialisation, e.g. the public start): per-example gradient norms of the trainable
    tensors over 512 of client 0's phrases, the norm of their mean clipped at the job's C, and
    the norm of one step's noise on that mean, ``σ C / B · √D`` (σ: the job's calibrated one)."""
    import torch

    from fedlora.kernels import Routing
    from fedlora.privacy.dpsgd import Capture, clip_factors, grad_samples
    from fedlora.tasks import gather_rows

    for strategy in args.strategies.split(","):
        built, coord = started(flags_of(strategy))
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


def clip_study(args: argparse.Namespace, flags_of: Flags) -> int:
    """Client 0 alone, from each strategy's ε = 8 start (as ``--snr``), ``--study-steps`` DP-SGD
    steps under each ``C:σ`` of ``--study-settings`` (C: a number, ``inf`` for no clipping, ``job``
    for the job's clip; σ: a number, or ``job`` for the job's calibrated one): the training loss
    and dev accuracy every 20 steps. Separates what the clip does from what the noise does."""
    from fedlora.training.train import TrainConfig

    for strategy in args.strategies.split(","):
        built, coord = started(flags_of(strategy))
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
