"""One-line refusals of a job that cannot run, shared by every entry point.

``args`` is parsed flags or a :class:`~fedlora.job.schema.JobConfig` (the same field names), so a
job that arrives as a Flower run config is checked as its flags would be. Each check raises a
:class:`~fedlora.errors.UserError` whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import math
from dataclasses import fields

from fedlora.data.columns import parse_columns
from fedlora.data.readers import locate, reader_for
from fedlora.errors import UserError, warn_once
from fedlora.job.defaults import measures_clip
from fedlora.job.flags import flag_name
from fedlora.job.paths import digest_of, same_setting
from fedlora.job.schema import USED_ONLY_WITH, JobConfig
from fedlora.models.hub import check_model_name
from fedlora.models.quantize import QUANTIZE, require_bitsandbytes
from fedlora.rounds.compress import parse_scheme
from fedlora.rounds.tracking import TRACKERS
from fedlora.strategies import STRATEGIES
from fedlora.strategies.robust import Robust
from fedlora.strategies.server_step import ServerStep
from fedlora.tasks import AUTO, EVALUATIONS, TASKS


def check_partition(args: JobConfig) -> None:
    """``--partition natural`` names its column; ``--partition-column`` goes with a partition that
    reads it."""
    if args.partition == "natural" and not args.partition_column:
        raise UserError("--partition natural gives each value of a data column its own client: name the"
                        " column with --partition-column NAME (e.g. category)")
    if args.partition_column and args.partition == "iid":
        raise UserError(f"--partition-column {args.partition_column} is what --partition natural,"
                        " dirichlet or dirichlet-clients split by; --partition iid reads no column: pass"
                        " one of those, or drop --partition-column")


def check_job_args(args: JobConfig, unused: bool = True) -> None:
    """Refuse bad job values in one line each: every entry point runs this once, on the job its
    codec made (:func:`fedlora.job.flags.to_config`, :func:`fedlora.job.runconfig.from_run_config`,
    which give unset fields their defaults).

    Parameters
    ----------
    args : JobConfig
        The job.
    unused : bool
        Also say the flags this job does not read (:func:`warn_unused`): where the job's flags were
        typed (not on a deployed client, which was sent the server's job: it did not set them, and
        the server has said so).
    """
    check_ranges(args)
    if STRATEGIES[args.strategy].adapter_plan.keep and not args.personal_test_fraction:
        raise UserError(f"--strategy {args.strategy} keeps personal factors on each client, so each"
                        " client has its own model: pass --personal-test-fraction (e.g. 0.2) to"
                        " measure those models on each client's own held-out examples")
    check_dp_args(args)
    check_partition(args)
    check_secagg_args(args)
    check_compress_args(args)
    check_ranks(args)
    try:
        inner = STRATEGIES[args.strategy].from_job(args)  # its options, checked before anything loads
        if args.norm_bound > 0 or args.robust_mean != "mean":  # what the server's defences can take
            Robust(inner, args.weighting, args.max_examples, args.norm_bound, args.robust_mean, args.trim)
        if args.server_lr != 1:
            ServerStep(inner, args.server_lr)
    except ValueError as exc:
        raise UserError(f"--strategy {args.strategy}: {exc}") from None
    check_task_args(args)
    check_init_args(args)
    check_quantize_args(args)
    check_track_args(args)
    check_model_name(args.model)  # a hub id the local HF cache lacks: one line, before anything runs
    if unused:
        warn_unused(args)


def check_ranges(args: JobConfig) -> None:
    """Refuse a number outside its range (finite, positive, at least 0, a fraction), in one line
    naming the flag."""
    check_numbers(args)
    positive = ("num_clients", "rounds", "local_steps", "batch_size", "rank", "max_length",
                "init_batches", "eval_batch_size")
    for name in positive:  # --max-length None: derived from the data later (resolve_max_length)
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"{flag_name(name)} must be ≥ 1, got {getattr(args, name)}")
    if not 0 <= (args.clients_per_round or 0) <= args.num_clients:  # more would be silently all
        raise UserError(f"--clients-per-round must be in 1..--num-clients ({args.num_clients}; 0: every"
                        f" client), got {args.clients_per_round}")
    zero = {"eval_max": "all", "max_new_tokens": "auto", "eval_every": "only after the last round",
            "save_every": "only the final adapter", "fewshot": "none"}
    for name, meaning in zero.items():
        if getattr(args, name) < 0:
            raise UserError(f"{flag_name(name)} must be ≥ 0 (0: {meaning}), got {getattr(args, name)}")
    if args.dpo_beta <= 0 or args.dpo_sft_weight < 0:
        raise UserError(f"--dpo-beta must be > 0 and --dpo-sft-weight ≥ 0, got {args.dpo_beta},"
                        f" {args.dpo_sft_weight}")
    if args.lr is not None and args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.lora_alpha <= 0:  # the scale α / r: 0 would train adapters that change nothing
        raise UserError(f"--lora-alpha must be > 0 (the update's scale is α / r), got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora-dropout is a probability in [0, 1) (0: none; recipes use 0.05-0.1), got"
                        f" {args.lora_dropout}")
    if args.lr_min < 0 or (args.lr_min and args.lr_schedule != "cosine"):
        raise UserError(f"--lr-min is the rate --lr-schedule cosine falls toward: it needs that schedule and"
                        f" must be ≥ 0, got {args.lr_min} with --lr-schedule {args.lr_schedule}")
    if args.max_examples < 0:
        raise UserError(f"--max-examples must be ≥ 1 (0: no cap), got {args.max_examples}")
    if args.norm_bound < 0 or not 0 <= args.trim < 0.5:
        raise UserError(f"--norm-bound must be ≥ 0 and --trim in [0, 0.5), got {args.norm_bound},"
                        f" {args.trim}")
    if not 0 <= args.personal_test_fraction < 1:
        raise UserError(f"--personal-test-fraction must be in [0, 1), got {args.personal_test_fraction}")


def warn_unused(args) -> None:
    """Say once each field set away from its default that this job does not read, and the setting
    that would read it (:data:`~fedlora.job.schema.USED_ONLY_WITH`); under ``--dp none``, that the
    run is not private."""
    for name, (reads, setting) in USED_ONLY_WITH.items():
        value = getattr(args, name)
        if value == JobConfig.__dataclass_fields__[name].default or reads(args):
            continue
        shown = "" if isinstance(value, bool) else f" {value}"
        off = args.dp == "none" and setting.startswith("--dp")
        private = ", so this run is not differentially private" if off else ""
        warn_once(f"{flag_name(name)}{shown} is not used: it is read only with {setting}{private}")


def check_ranks(args: JobConfig) -> None:
    """Refuse ``--ranks`` below 1 (a config file's or run config's list: the flag checks its own) or
    differing on a strategy that needs one rank for every client."""
    if args.ranks and min(args.ranks) < 1:
        raise UserError(f"--ranks takes positive integers, got {','.join(map(str, args.ranks))}")
    if args.ranks is not None and not STRATEGIES[args.strategy].heterogeneous_ranks:
        if len(set(args.ranks)) > 1:
            takes = ", ".join(sorted(n for n, c in STRATEGIES.items() if c.heterogeneous_ranks))
            raise UserError(f"--strategy {args.strategy} needs one rank for every client;"
                            f" use --rank, or a strategy that takes heterogeneous ranks ({takes})")


def check_numbers(args: JobConfig) -> None:
    """Refuse a number no setting takes whatever the rest of the job: NaN or infinity (which the
    range checks after it would let through, as every comparison with NaN is false), a negative
    weight decay or clip, a seed the random generators refuse."""
    for f in fields(JobConfig):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag_name(f.name)} must be a finite number, got {value}: pass one, or leave"
                            " the flag out for its default")
    if args.weight_decay < 0:  # torch's optimizers refuse it, once the job has begun
        raise UserError(f"--weight-decay must be ≥ 0 (0: none), got {args.weight_decay}")
    if args.max_grad_norm is not None and args.max_grad_norm <= 0:  # a factor ≤ 0 would zero or flip steps
        raise UserError(f"--max-grad-norm must be > 0, got {args.max_grad_norm}: pass a bound, or leave the"
                        " flag out (no clipping; with --dp sample, the DP recipe's)")
    if not 0 <= args.seed < 2**32:  # numpy's generators take no negative seed, torch's none past 2**64
        raise UserError(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")


def check_init_args(args) -> None:
    """Refuse ``--init-data`` that nothing reads and a ``--head`` the job cannot have."""
    if args.head != "train" and not TASKS[args.task].trains_head:
        raise UserError(f"--head {args.head} is for a task with a head (--task classification);"
                        f" --task {args.task} has none")
    if args.head == "public" and not args.init_data:
        raise UserError("--head public trains the head on a public file: pass --init-data FILE")
    if args.public_steps < 0:
        raise UserError(f"--public-steps must be ≥ 0 (0: no public warm start), got {args.public_steps}")
    if args.public_steps and not args.init_data:
        raise UserError("--public-steps trains the adapters on a public file: pass --init-data FILE")
    strategy = STRATEGIES[args.strategy].from_job(args)
    if args.public_steps and (strategy.folds or strategy.plan(1).keep):
        where = "folds every round into the base" if strategy.folds else "keeps a factor on each client"
        raise UserError(f"--public-steps starts the global adapters from a public update, but --strategy"
                        f" {args.strategy} {where}: drop --public-steps or choose another strategy")
    calibration = getattr(args, "quant_calibration", "")  # --init-data is its default
    calibrates = getattr(args, "quant_correction", 0) and calibration in ("", args.init_data)
    if (args.init_data and args.head != "public" and not args.public_steps
            and not strategy.init_phases and not calibrates):
        raise UserError(f"--init-data is read by Fed-SB's initialisation, --head public, --public-steps"
                        f" and --quant-correction; --strategy {args.strategy} with --head {args.head} reads"
                        " none: drop it")


def check_quantize_args(args) -> None:
    """Refuse a ``--quantize`` job that cannot load or train, in one line."""
    quantize = getattr(args, "quantize", "none")
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize in ("none", "int8") and getattr(args, "double_quant", False):
        raise UserError("--double-quant quantizes the scales of 4-bit blocks: it needs --quantize nf4 or fp4")
    check_fold_rank(args)
    check_quant_correction(args)
    if quantize == "none":
        return
    if args.model == "minilm":
        raise UserError(f"--quantize {quantize}: the bundled MiniLM is tiny (22M parameters) and its"
                        " classification head is never quantized, so there is little to save: quantize a"
                        " causal LM (--model smollm2, a .gguf file or a local LLM folder)")
    require_bitsandbytes(quantize)


def check_fold_rank(args) -> None:
    """Refuse a ``--fold-rank`` that would bound nothing, in one line."""
    rank = getattr(args, "fold_rank", 0)
    if rank < 0:
        raise UserError(f"--fold-rank must be ≥ 1 (0: the whole residual, exactly), got {rank}")
    if not rank:
        return
    if not STRATEGIES[args.strategy].folds:
        takes = ", ".join(sorted(n for n, c in STRATEGIES.items() if c.folds))
        raise UserError(f"--fold-rank bounds the residual of folded updates, and --strategy {args.strategy}"
                        f" does not fold ({takes} do): drop --fold-rank")
    if getattr(args, "quantize", "none") == "none":
        raise UserError("--fold-rank bounds the residual kept beside a quantized base; without --quantize"
                        " folds go into the weights exactly, at no cost in rank: drop --fold-rank or"
                        " pass --quantize nf4")
    if getattr(args, "init_adapter", ""):
        raise UserError("--fold-rank would truncate --init-adapter's update together with the folds, and the"
                        " export could not tell them apart: drop one of them")


def check_quant_correction(args) -> None:
    """Refuse a ``--quant-correction`` with nothing to correct, or a calibration file with no correction."""
    rank = getattr(args, "quant_correction", 0)
    if rank < 0:
        raise UserError(f"--quant-correction must be ≥ 1 (0: none), got {rank}")
    if getattr(args, "quant_calibration", "") and not rank:
        raise UserError("--quant-calibration sets the input scales of --quant-correction: pass"
                        " --quant-correction N (e.g. 8), or drop --quant-calibration")
    if rank and getattr(args, "quantize", "none") == "none":
        raise UserError("--quant-correction corrects a quantized base's error, and without --quantize the"
                        " base has none: pass --quantize nf4, or drop --quant-correction")
    if getattr(args, "quant_calibration", ""):
        try:
            reader_for(locate(args.quant_calibration))
        except UserError as exc:
            raise UserError(f"--quant-calibration: {exc}") from None


def check_task_args(args) -> None:
    """Refuse a job its task cannot run: another task's options, or data or a model it cannot use."""
    task = TASKS[args.task]
    if args.eval != JobConfig.eval and task.model_kind != "causal-lm":
        raise UserError(f"--eval {args.eval} scores answers by a causal language model's log-likelihood, and"
                        f" --task {task.name} is a {task.model_kind} model: use --task sft with a causal LM"
                        " (--model smollm2, a .gguf file or a local LLM folder)")
    if args.metric != AUTO and not EVALUATIONS[args.eval].takes_metric:
        raise UserError(f"--metric {args.metric} scores generated answers, and --eval {args.eval} generates"
                        " none: drop --metric")
    for name, other in ((n, t) for t in TASKS.values() if t is not task for n in t.options):
        if name not in task.options and getattr(args, name) != JobConfig.__dataclass_fields__[name].default:
            raise UserError(f"{flag_name(name)} is for --task {other.name} (this job is --task {task.name})")
    if args.data not in task.datasets and args.data in {d for t in TASKS.values() for d in t.datasets}:
        raise UserError(f"--data {args.data} is not for --task {task.name}; it reads"
                        f" {' or '.join([*task.datasets, 'a data file (--data FILE)'])}")
    parse_columns(args.columns)  # --columns' names: one line now, not when the data is read
    files = any(getattr(args, f, "") for f in ("test_data", "init_data", "quant_calibration"))
    for name in ("text_column", "label_column"):  # the bundled data's columns are not the user's to name
        if (args.data in task.datasets and not files
                and getattr(args, name) != JobConfig.__dataclass_fields__[name].default):
            raise UserError(f"{flag_name(name)} names a column of a data file, and --data {args.data} is"
                            " the bundled BBC News, whose columns are fixed (and no other data file is"
                            " given): drop it, or pass --data FILE")
    if task.model_kind == "causal-lm" and args.model == "minilm":  # the bundled encoder
        raise UserError(f"--task {task.name} needs a causal language model, and minilm is an encoder:"
                        " pass --model smollm2, a .gguf file or a local LLM folder")


def check_dp_args(args) -> None:
    """Refuse DP settings that would give no guarantee, in one line each.

    ``args``: parsed flags or a :class:`JobConfig` (the same field names), so a job that
    arrives as a Flower run config is checked as its flags would be.
    """
    quantile = getattr(args, "clip_quantile", None)
    if quantile is not None and not (0 < quantile <= 1 and measures_clip(args)):
        raise UserError(f"--clip-quantile {quantile:g}: it must be in (0, 1], and it sets the clip"
                        " measured on a public file: pass --dp sample and --init-data FILE, without"
                        " --max-grad-norm")
    if args.dp == "none":
        return
    if args.epsilon <= 0:
        raise UserError(f"--dp {args.dp} needs a budget: pass --epsilon (e.g. 8) and --delta")
    if not 0 < args.delta < 1:
        raise UserError(f"--delta must be in (0, 1), got {args.delta}")
    if args.noise_multiplier < 0:
        raise UserError(f"--noise-multiplier must be ≥ 0 (0: calibrate), got {args.noise_multiplier}")
    if getattr(args, "dp_backend", "auto") not in ("auto", "fedlora", "opacus"):
        raise UserError(f"--dp-backend must be auto, fedlora or opacus, got {args.dp_backend!r}")
    check_public_file(args)
    if args.dp == "sample":
        if getattr(args, "gradient_checkpointing", False):
            raise UserError("--gradient-checkpointing recomputes activations, which DP-SGD's per-example"
                            " gradient hooks would see twice; drop one of the two")
        if getattr(args, "dp_backend", "auto") == "opacus" and not TASKS[args.task].opacus:
            raise UserError(f"--dp-backend opacus clips each model row, and --task {args.task}'s example is"
                            " several rows (a preference pair): use --dp-backend fedlora (or auto)")
    else:
        if not STRATEGIES[args.strategy].sum_only:
            takes = ", ".join(sorted(n for n, c in STRATEGIES.items() if c.sum_only))
            raise UserError(f"--dp client needs a strategy whose aggregate is a sum of client"
                            f" updates ({takes}); {args.strategy}'s is not, so clipping and"
                            " noising a sum would not bound each client's influence")
        if args.update_clip <= 0:
            raise UserError(f"--update-clip must be > 0, got {args.update_clip}")
        if args.delta >= 1 / args.num_clients:
            raise UserError(f"--delta {args.delta:g} is not below 1/(clients) = {1 / args.num_clients:g};"
                            " pass a smaller --delta")


def check_public_file(args) -> None:
    """Refuse, under ``--dp``, an ``--init-data`` or ``--quant-calibration`` holding ``--data``'s files:
    they are read at no ε (the head, the warm start, the clip, Fed-SB's initialisation, the quantized
    base's correction), so they must be public."""
    for name in ("init_data", "quant_calibration"):
        public = getattr(args, name, "")
        try:  # a renamed copy too; a hub id not cached here is left to the loading, which names it
            digest = digest_of(public, names=False) if public else None
            copy = digest is not None and digest == digest_of(args.data, names=False)
        except UserError:
            copy = False
        if public and (copy or same_setting(args, "data", public)):
            raise UserError(f"{flag_name(name)} {public!r} holds the same examples as --data: under --dp"
                            f" {args.dp} it is read at no privacy cost, so it must be a public file that no"
                            f" client's data comes from; pass another {flag_name(name)}, or drop it")


def check_secagg_args(args) -> None:
    """Refuse a ``--secagg`` job the server could not run on the clients' mean alone, in one line."""
    if not 0 < args.secagg_threshold <= 1 or args.secagg_range < 0:
        raise UserError(f"--secagg-threshold must be in (0, 1] and --secagg-range ≥ 0, got"
                        f" {args.secagg_threshold}, {args.secagg_range}")
    if not args.secagg:
        defaults = JobConfig.__dataclass_fields__
        given = [n for n in ("secagg_range", "secagg_threshold") if getattr(args, n) != defaults[n].default]
        if given:  # they set up --secagg's masking, which this job does not do
            raise UserError(f"{flag_name(given[0])} sets up --secagg, which this job does not use: pass"
                            f" --secagg, or drop {flag_name(given[0])}")
        return
    if not STRATEGIES[args.strategy].sum_only:
        takes = ", ".join(sorted(n for n, c in STRATEGIES.items() if c.sum_only))
        raise UserError(f"--secagg needs a strategy whose aggregate is a weighted mean of the uploads"
                        f" ({takes}); {args.strategy}'s is not, so the server cannot run it on the"
                        " clients' masked sum")
    per_round = args.per_round()
    if per_round < 2:
        raise UserError(f"--secagg needs at least 2 clients per round (a mean of one client is that"
                        f" client's update), got {per_round}")
    if args.norm_bound > 0 or args.robust_mean != "mean":
        raise UserError("--secagg hides each client's update from the server, so --norm-bound and"
                        " --robust-mean have nothing to inspect: drop them or --secagg")
    if STRATEGIES[args.strategy].from_job(args).init_releases:
        raise UserError(f"--secagg does not cover {args.strategy}'s initialisation, whose uploads are"
                        " each client's gradient sketches: pass --strategy-options init=seed, or a"
                        " public --init-data FILE")


def check_compress_args(args) -> None:
    """Refuse an unknown ``--compress`` / ``--compress-down`` scheme, and the combinations that cannot
    run, in one line: top-k for downloads (the server's state is not sparse), and ``--compress``
    with ``--secagg``, which already quantizes each update (SecAgg+'s integers over [-R, R])."""
    up = parse_scheme(args.compress, "--compress")
    down = parse_scheme(args.compress_down, "--compress-down")
    if not down.idempotent:
        raise UserError(f"--compress-down {args.compress_down}: the server's global state is not sparse, so"
                        " it travels as none, fp16, bf16, int8 or nf4 (top-k is for uploads)")
    if args.secagg and up.name != "none":
        raise UserError(f"--compress {args.compress} with --secagg: SecAgg+ already quantizes each update"
                        " to integers over [-R, R] before masking it; drop --compress (or --secagg)")


def check_track_args(args) -> None:
    """Refuse an unknown ``--track`` tracker, or one whose package is not installed, in one line."""
    for name in getattr(args, "track", None) or []:
        if name not in TRACKERS:
            raise UserError(f"unknown tracker {name!r} for --track; choose from"
                            f" {', '.join(sorted(TRACKERS))}")
        missing = TRACKERS[name].missing()
        if missing:
            raise UserError(missing)
