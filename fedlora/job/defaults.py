"""The defaults that depend on the rest of a job: the DP recipe, the strategy's learning rate,
the measured clip, the device.

:func:`fill_defaults` gives the fields a job left unset (None) their values; every entry point
runs it once, through :func:`fedlora.job.checks.check_job_args`.
"""

from __future__ import annotations

from typing import Any

from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.strategies import STRATEGIES
from fedlora.tasks import TASKS

DP_RECIPE: dict[str, Any] = {"batch_size": 256, "max_grad_norm": 0.1, "lr": 3e-3, "head": "frozen"}
"""``--dp sample``'s defaults for the flags a job leaves unset: Poisson batch, per-example clip,
AdamW learning rate and head, measured by ``benchmarks/dp_learning.py --sweep`` (RESULTS.md, "DP
recipe"): FFA-LoRA on SST-2 at ε = 8. At the start of training a MiniLM head holds over 99% of
an example's gradient norm, so a trained head would take the whole clip and leave LoRA's factors
with noise alone; frozen, the clip (0.1, about the factors' own per-example norm) is theirs.
The lr was re-chosen on a validation part (FedAvg with a sentence-disjoint public warm start at
ε = 8, against 1e-3 and 1e-2: RESULTS.md, "DP-SGD on MiniLM, re-measured") and stays 3e-3; the
clip and head (the job without a public file) were read on dev and not re-derived."""


CLIP_QUANTILE = 0.5
"""``--dp sample`` with a public ``--init-data`` file and no ``--max-grad-norm``: the per-example
clip is this quantile of the per-example gradient norms of the trainable tensors, measured by the
server on the public examples at the start of training (after the public head, initialisation
and warm start), at no privacy cost. The norms' scale depends on the model, the task and what
trains (medians on SST-2's 1,000 public phrases at the public start: Fed-SB's r × r cores 4.83,
LoRA's B (FFA-LoRA) and A, B (FedAvg) 1.42), so no fixed clip fits every job; and a clip far
below every norm (the recipe's 0.1) turns DP-SGD into a mean of normalised gradients, which on
SST-2 raised Fed-SB's training loss even without noise (RESULTS.md, "The per-example clip")."""



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
    ``--init-data`` file is given), ``--max-length`` 64 (``--task sft`` leaves it to
    :func:`fedlora.job.setup.resolve_max_length`, which reads the data), ``--lr`` :func:`default_lr`,
    ``--quant-calibration`` ``--init-data`` (with ``--quant-correction``), and under ``--dp sample``
    the recipe's per-example clip ``--max-grad-norm``."""
    private = args.dp == "sample"
    if args.head is None and private and TASKS[args.task].trains_head:
        # a public file trains the head at no ε (SST-2: a 65% start, a frozen random head 51-53%)
        args.head = "public" if args.init_data else DP_RECIPE["head"]
    elif args.head is None:
        args.head = JobConfig.head
    if args.batch_size is None:
        args.batch_size = DP_RECIPE["batch_size"] if private else JobConfig.batch_size
    if args.max_length is None and not TASKS[args.task].length_from_data:
        args.max_length = JobConfig.max_length  # else derived from the data (fedlora.job.setup)
    if args.lr is None:
        args.lr = default_lr(args.strategy, args.dp)
    if getattr(args, "quant_correction", 0) and not args.quant_calibration and args.init_data:
        args.quant_calibration = args.init_data  # recorded, so an evaluation calibrates as the run did
    if measures_clip(args):
        if args.clip_quantile is None:
            args.clip_quantile = CLIP_QUANTILE
    elif private and args.max_grad_norm is None:
        args.max_grad_norm = DP_RECIPE["max_grad_norm"]



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


