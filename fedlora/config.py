"""One federated job's settings, shared by ``fedlora-sim``, ``fedlora-server`` and Flower.

The same job is spelled three ways, all generated from :class:`JobConfig`:

* command-line flags (``--local-steps 10``), added by :func:`add_job_arguments`;
* Flower run-config keys (``local-steps = 10``), the flag names without dashes
  (:func:`to_run_config` / :func:`from_run_config`), which is what ``flwr run`` and
  the ServerApp read;
* ``config.json`` in an output folder (``dataclasses.asdict``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from fedlora.errors import UserError
from fedlora.strategies import STRATEGIES


@dataclass
class JobConfig:
    """One federated job (the ``fedlora-sim`` flags)."""

    strategy: str = "fedavg"
    model: str = "minilm"
    data: str = "bbcnews"
    task: str = "classification"
    text_column: str = "text"
    label_column: str = "label"
    num_clients: int = 10
    rounds: int = 3
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 2e-3
    rank: int = 8
    ranks: list[int] | None = None
    lora_alpha: float = 16.0
    target_modules: list[str] | None = None
    partition: str = "iid"
    alpha: float = 0.5
    max_length: int = 64
    test_fraction: float = 0.2
    seed: int = 0
    device: str = "cpu"
    init_batches: int = 2
    fair_lambda: float = 0.01
    sb_init_lr: float = 1e-3
    max_grad_norm: float | None = None
    eval_batch_size: int = 64
    clients_per_round: int = 0       # 0: every client, every round
    max_clients_per_pass: int = 0    # simulator: clients trained in one pass; 0: automatic
    precision: str = "fp32"          # or "bf16" (autocast of the forward)
    dp: str = "none"                 # "sample" (DP-SGD per client) or "client" (server side)
    epsilon: float = 0.0             # DP budget ε (required with dp)
    delta: float = 1e-5              # DP δ
    noise_multiplier: float = 0.0    # 0: calibrated to (ε, δ) over the planned steps
    update_clip: float = 1.0         # dp client: each client's update is clipped to this norm
    dp_reproducible: bool = False    # DP randomness from --seed (tests, parity checks; not private)
    dp_run_id: str = ""              # names the clients' privacy ledgers; kept by --resume
    dp_backend: str = "auto"         # dp sample: "fedlora" (batched), "opacus", auto: by process

    def client_ranks(self) -> list[int]:
        return list(self.ranks) if self.ranks else [self.rank] * self.num_clients

    def rank_of(self, client: int) -> int:
        """Rank of client (partition) ``client``: ``ranks`` cycled, else ``rank``."""
        return self.ranks[client % len(self.ranks)] if self.ranks else self.rank

    def train_config(self, lone: bool = False):
        """The local-training settings (:class:`fedlora.train.TrainConfig`).

        ``lone``: for a client that trains alone (a deployed one), whose ``--dp-backend auto``
        is Opacus; the batched simulator's is fedlora's kernels.
        """
        from fedlora.train import TrainConfig

        clip = self.max_grad_norm
        if self.dp == "sample" and clip is None:
            clip = 1.0  # DP-SGD always clips per example
        return TrainConfig(task=self.task, local_steps=self.local_steps, batch_size=self.batch_size,
                           lr=self.lr, max_grad_norm=clip, precision=self.precision,
                           dp_sample=self.dp == "sample", dp_reproducible=self.dp_reproducible,
                           dp_backend=self.dp_backend_for(lone))

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

    def sampler(self, client: int, indices):
        """Client ``client``'s example order: the same in the simulator and deployment."""
        from fedlora.train import ClientSampler

        return ClientSampler(indices, seed=self.seed * 100_003 + client)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_ranks(text: str, flag: str = "--ranks") -> list[int]:
    """``4,8,16`` -> ``[4, 8, 16]`` (argparse type): positive integers."""
    try:
        ranks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes integers like 4,8,16, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"{flag} takes positive integers, got {text!r}")
    return ranks


def add_job_arguments(p: argparse.ArgumentParser, *, num_clients_help: str = "clients") -> None:
    """The job flags, shared by ``fedlora-sim`` and ``fedlora-server``."""
    job = p.add_argument_group("job")
    job.add_argument("--strategy", choices=sorted(STRATEGIES), default="fedavg")
    job.add_argument("--num-clients", type=int, default=10, help=num_clients_help)
    job.add_argument("--rounds", type=int, default=3)
    job.add_argument("--local-steps", type=int, default=10)
    job.add_argument("--batch-size", type=int, default=8, help="examples per client per step")
    job.add_argument("--lr", type=float, default=None,
                     help="local AdamW learning rate (default: 1e-2 for fed-sb, which trains only"
                          " the r×r cores, 2e-3 for the others)")
    job.add_argument("--rank", type=int, default=8)
    job.add_argument("--ranks", type=parse_ranks, default=None,
                     help="per-client ranks, cycled over clients (e.g. 4,8,16); flora only")
    job.add_argument("--lora-alpha", type=float, default=16.0)
    job.add_argument("--target-modules", nargs="+", default=None,
                     help="module names or regexes to adapt (default: attention query/value)")
    job.add_argument("--seed", type=int, default=0)
    job.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto")
    data = p.add_argument_group("data and model")
    data.add_argument("--model", default="minilm",
                      help="'minilm' (bundled all-MiniLM-L6-v2) or a local model folder")
    data.add_argument("--task", choices=["classification", "causal-lm"], default="classification")
    data.add_argument("--data", default="bbcnews",
                      help="'bbcnews' (bundled) or a .csv/.tsv/.jsonl file")
    data.add_argument("--text-column", default="text")
    data.add_argument("--label-column", default="label")
    data.add_argument("--partition", choices=["iid", "dirichlet"], default="iid")
    data.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    data.add_argument("--max-length", type=int, default=64, help="tokens per example")
    data.add_argument("--test-fraction", type=float, default=0.2)
    strat = p.add_argument_group("strategy options")
    strat.add_argument("--fair-lambda", type=float, default=0.01, help="LoRA-FAIR λ")
    strat.add_argument("--sb-init-lr", type=float, default=1e-3,
                       help="Fed-SB: η of the approximated first step −η·sign(G)")
    strat.add_argument("--init-batches", type=int, default=2,
                       help="Fed-SB: local batches per client for the gradient estimate")
    strat.add_argument("--max-grad-norm", type=float, default=None,
                       help="clip each client's gradient norm per step")
    strat.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: autocast the forward pass (for GPUs; parameters stay fp32)")
    dp = p.add_argument_group("differential privacy")
    dp.add_argument("--dp", choices=["none", "sample", "client"], default="none",
                    help="sample: DP-SGD on each client (per-example clipping to --max-grad-norm,"
                         " Poisson batches); client: the server clips each client's update to"
                         " --update-clip and noises the sum (fedavg, fed-sb)")
    dp.add_argument("--epsilon", type=float, default=0.0, help="privacy budget ε (required with --dp)")
    dp.add_argument("--delta", type=float, default=1e-5,
                    help="δ; must be below 1/(a client's examples) for --dp sample, 1/(clients) for client")
    dp.add_argument("--noise-multiplier", type=float, default=0.0,
                    help="fixed σ instead of calibrating it to --epsilon: with --dp sample a client"
                         " stops training when its budget is spent; with --dp client a σ that cannot"
                         " afford every round is refused")
    dp.add_argument("--update-clip", type=float, default=1.0,
                    help="--dp client: L2 bound of each client's update (all its uploaded tensors)")
    dp.add_argument("--dp-backend", choices=["auto", "fedlora", "opacus"], default="auto",
                    help="--dp sample: who computes DP-SGD. fedlora: per-example gradients of every"
                         " client of a pass in one forward/backward; opacus: Opacus' GradSampleModule"
                         " and DPOptimizer, one client at a time; auto: opacus on a deployed client,"
                         " fedlora in the simulator")
    dp.add_argument("--dp-reproducible", action="store_true",
                    help="draw the DP noise and Poisson batches from --seed instead of OS entropy, so"
                         " runs repeat exactly; for tests only: knowing the seed removes the noise")


def check_job_args(args: argparse.Namespace) -> None:
    """Refuse bad job values in one line each."""
    positive = ("num_clients", "rounds", "local_steps", "batch_size", "rank", "max_length",
                "init_batches")
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.lr is not None and args.lr <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    check_dp_args(args)
    if args.ranks is not None and not STRATEGIES[args.strategy].heterogeneous_ranks:
        if len(set(args.ranks)) > 1:
            raise UserError(f"--strategy {args.strategy} needs one rank for every client;"
                            " use --rank, or --strategy flora for heterogeneous ranks")


def check_dp_args(args) -> None:
    """Refuse DP settings that would give no guarantee, in one line each.

    ``args``: parsed flags or a :class:`JobConfig` (the same field names), so a job that
    arrives as a Flower run config is checked as its flags would be.
    """
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
    if args.dp == "sample":
        if args.max_grad_norm is not None and args.max_grad_norm <= 0:
            raise UserError(f"--max-grad-norm must be > 0, got {args.max_grad_norm}")
    else:
        if not STRATEGIES[args.strategy].sum_only:
            raise UserError(f"--dp client needs a strategy whose aggregate is a sum of client"
                            f" updates (fedavg, fed-sb); {args.strategy}'s is not, so clipping and"
                            " noising a sum would not bound each client's influence")
        if args.update_clip <= 0:
            raise UserError(f"--update-clip must be > 0, got {args.update_clip}")
        if args.delta >= 1 / args.num_clients:
            raise UserError(f"--delta {args.delta:g} is not below 1/(clients) = {1 / args.num_clients:g};"
                            " pass a smaller --delta")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, or an existing non-empty folder unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {str(out)!r} already has results; pass --overwrite to"
                        " replace them or choose another folder")


def default_lr(strategy: str) -> float:
    """Fed-SB trains only R (r×r per layer) and wants a larger step than LoRA's A and B."""
    return 1e-2 if strategy == "fed-sb" else 2e-3


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
    """The :class:`JobConfig` for parsed job flags."""
    ranks = None
    if args.ranks is not None:
        ranks = [args.ranks[k % len(args.ranks)] for k in range(args.num_clients)]
    return JobConfig(
        strategy=args.strategy, model=args.model, data=args.data, task=args.task,
        text_column=args.text_column, label_column=args.label_column,
        num_clients=args.num_clients, rounds=args.rounds, local_steps=args.local_steps,
        batch_size=args.batch_size, lr=args.lr if args.lr is not None else default_lr(args.strategy),
        rank=args.rank, ranks=ranks,
        lora_alpha=args.lora_alpha, target_modules=args.target_modules,
        partition=args.partition, alpha=args.alpha, max_length=args.max_length,
        test_fraction=args.test_fraction, seed=args.seed,
        device=device if device is not None else resolve_device(args.device),
        init_batches=args.init_batches, fair_lambda=args.fair_lambda,
        sb_init_lr=args.sb_init_lr, max_grad_norm=args.max_grad_norm,
        clients_per_round=getattr(args, "clients_per_round", None) or 0,
        max_clients_per_pass=getattr(args, "max_clients_per_pass", None) or 0,
        precision=args.precision,
        dp=getattr(args, "dp", "none"), epsilon=getattr(args, "epsilon", 0.0),
        delta=getattr(args, "delta", 1e-5), noise_multiplier=getattr(args, "noise_multiplier", 0.0),
        update_clip=getattr(args, "update_clip", 1.0),
        dp_reproducible=getattr(args, "dp_reproducible", False),
        dp_backend=getattr(args, "dp_backend", "auto"),
    )


# ---- Flower run config: TOML scalars only, so lists are strings and None is 0 / "" ----

def to_run_config(cfg: JobConfig) -> dict[str, object]:
    """``JobConfig`` as Flower run-config entries (kebab-case keys, TOML scalars)."""
    out: dict[str, object] = {}
    for f in fields(JobConfig):
        value = getattr(cfg, f.name)
        if f.name == "ranks":
            value = ",".join(str(r) for r in value) if value else ""
        elif f.name == "target_modules":
            value = " ".join(value) if value else ""
        elif f.name == "max_grad_norm":
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
        elif f.name == "max_grad_norm":
            value = float(value) or None
        elif isinstance(getattr(cfg, f.name), float):
            value = float(value)
        elif isinstance(getattr(cfg, f.name), int):
            value = int(value)
        setattr(cfg, f.name, value)
    if "lr" in run_config and float(run_config["lr"]) <= 0:  # 0: the strategy's default
        cfg.lr = default_lr(cfg.strategy)
    return cfg
