"""In-process federated run on the batched core: every client of a round in one pass.

Thin glue: the job's data and model (:func:`build_job`), the round loop of every engine
(:func:`fedlora.rounds.loop.run`) over the batched transport (:mod:`fedlora.simulations.batched`:
a round's clients train together, one forward/backward per step), the output folder as its sink.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedlora.data.loading import partition
from fedlora.job.schema import JobConfig
from fedlora.job.setup import build_model, personal_split, prepared, public_data, splits
from fedlora.models.export import export_model
from fedlora.models.hub import resolve_model_path
from fedlora.models.model import FederatedModel
from fedlora.plan.memory import MemoryPlan, default_response_tokens, plan_memory
from fedlora.plan.shape import build_shape
from fedlora.privacy.accounting import ClientBudgets, sample_budgets
from fedlora.rounds import loop
from fedlora.rounds.build import make_strategy
from fedlora.rounds.coordinator import Coordinator
from fedlora.rounds.sink import RunFolder
from fedlora.rounds.tracking import Tracking
from fedlora.simulations.batched import BatchedTransport
from fedlora.strategies import Strategy
from fedlora.tasks import Task, get_task
from fedlora.training.train import ClientSampler

SimConfig = JobConfig  # the simulator's name for a job's settings

__all__ = ["Job", "SimConfig", "build_job", "run"]


@dataclass
class Job:
    """Everything a run needs, built once."""

    cfg: JobConfig
    task: Task
    strategy: Strategy
    fm: FederatedModel
    train: dict[str, torch.Tensor]
    test: object  # the task's evaluation set
    samplers: list[ClientSampler]
    model_path: str
    label_names: list[str]
    budgets: ClientBudgets | None = None  # --dp sample: one privacy ledger per client
    personal: list[object] | None = None  # --personal-test-fraction: each client's own test set
    public: dict[str, torch.Tensor] | None = None  # --init-data, encoded


def build_job(cfg: JobConfig) -> Job:
    """Load data and model, partition clients, wrap the model with one slot per client of a pass."""
    task, strategy = get_task(cfg.task), make_strategy(cfg)
    train_ds, test_ds, label_names = splits(cfg, task)
    parts = partition(train_ds, cfg.num_clients, cfg.partition, cfg.alpha, cfg.seed)
    held = [personal_split(cfg, k, len(idx)) for k, idx in enumerate(parts)]
    slots = pass_size(cfg, cfg.per_round(), len(label_names))
    fm, tokenizer, path = build_model(cfg, [max(cfg.client_ranks())] * slots, strategy.plan(1),
                                      len(label_names), label_names)
    samplers = [ClientSampler.for_client(cfg, k, [idx[i] for i in train])
                for k, (idx, (train, _)) in enumerate(zip(parts, held, strict=True))]
    budgets = (sample_budgets(cfg, [len(s) for s in samplers], strategy.init_releases, fm.model)
               if cfg.dp == "sample" else None)
    personal = None
    if cfg.personal_test_fraction:
        personal = [prepared(task, fm, cfg, task.eval_set(tokenizer, train_ds.subset([idx[i] for i in test]),
                                                          cfg))
                    for idx, (_, test) in zip(parts, held, strict=True)]
    return Job(cfg, task, strategy, fm, prepared(task, fm, cfg, task.encode(tokenizer, train_ds, cfg)),
               prepared(task, fm, cfg, task.eval_set(tokenizer, test_ds, cfg)), samplers, path, label_names,
               budgets, personal, prepared(task, fm, cfg, public_data(cfg, task, tokenizer, label_names)))


#: CPU passes hold about this many tokens (rows × ``--max-length``): per token, a CPU step is
#: fastest at a few thousand tokens and slower in larger passes (``benchmarks/pass_size.py``).
CPU_PASS_TOKENS = 4096
#: On a GPU a pass fills at most this share of the free memory by ``fedlora-plan``'s estimate of the
#: job (:func:`fedlora.plan.memory.plan_memory`: the base once, then each client's adapter,
#: gradients, optimizer state and activations); the rest is margin for what it leaves out (the
#: allocator's cache, evaluation). ``benchmarks/gpu_suite.py`` measures the estimate against a step.
GPU_MEMORY_SHARE = 0.8


def gpu_memory_plan(cfg: JobConfig, num_labels: int = 2) -> MemoryPlan:
    """``fedlora-plan``'s memory of the job, from its model's config (built on the meta device)."""
    shape = build_shape(replace(cfg, model=str(resolve_model_path(cfg.model))), num_labels)
    return plan_memory(shape, cfg, default_response_tokens(cfg))


def pass_size(cfg: JobConfig, clients: int, num_labels: int = 2) -> int:
    """Clients per forward/backward: 1 for ``--dp-backend opacus``, else ``--max-clients-per-pass``,
    else on CPU as many as fill :data:`CPU_PASS_TOKENS`, else as many as ``fedlora-plan``'s
    estimate of the job fits in :data:`GPU_MEMORY_SHARE` of the free GPU memory
    (:func:`gpu_memory_plan`; ``num_labels``: a classification head's outputs)."""
    if cfg.dp == "sample" and cfg.dp_backend_for(lone=False) == "opacus":
        return 1  # Opacus' DP-SGD is one client at a time
    if cfg.max_clients_per_pass:
        return min(cfg.max_clients_per_pass, clients)
    tokens = cfg.batch_size * cfg.max_length * get_task(cfg.task).rows_per_example  # a client's step, at most
    if not cfg.device.startswith("cuda"):
        return max(1, min(clients, CPU_PASS_TOKENS // tokens))
    free, _ = torch.cuda.mem_get_info(torch.device(cfg.device))
    fits = gpu_memory_plan(cfg, num_labels).largest_pass(int(GPU_MEMORY_SHARE * free))
    return max(1, min(clients, fits))


def train(cfg: JobConfig, out_dir: Path, on_step: Callable[[int], None] | None = None,
          on_round: Callable[[dict], None] | None = None,
          schedule: Callable[[int], list[int]] | None = None,
          tracking: Callable[[], Tracking | None] | None = None, checkpoints: bool = False,
          resume: bool = False) -> tuple[Job, Coordinator]:
    """Run the job's rounds, one JSON line per round in ``out_dir/metrics.jsonl``. Returns
    ``(job, coordinator)``: the job's model is then the global one, the coordinator holds the
    state and the rows.

    ``schedule``: round -> its clients, in place of ``cfg.sampled`` (to replay the participation
    of a deployed run, whose clients may have died: ``benchmarks/load.py``). ``tracking``: opens, once
    the job is set up, the experiment trackers every row also goes to (left open). ``checkpoints``:
    write the coordinator's checkpoint (with the simulated clients' kept factors, error feedback and DP
    steps) after every round;
    ``resume``: continue after the checkpoint in ``out_dir``."""
    t0 = time.perf_counter()
    job = build_job(cfg)
    sink = RunFolder(out_dir, checkpoints=checkpoints or resume, on_round=on_round,
                     tracking=tracking() if tracking is not None else None)
    coord = Coordinator(cfg, job.strategy, job.fm, job.test, job.public)
    if resume:
        coord.restore(out_dir)
        sink.resume(coord.rows)
    else:
        sink.begin(cfg)
    sink.export = lambda folder: export_model(job.fm, coord.state, folder, job.model_path,
                                              job.task.peft_task_type, job.label_names, job.task.name)
    loop.run(coord, BatchedTransport(job, coord, on_step), sink, schedule, started=t0)
    return job, coord


def run(cfg: JobConfig, out_dir: Path, on_step: Callable[[int], None] | None = None,
        on_round: Callable[[dict], None] | None = None,
        schedule: Callable[[int], list[int]] | None = None,
        tracking: Callable[[], Tracking | None] | None = None, checkpoints: bool = False,
        resume: bool = False) -> list[dict]:
    """:func:`train`, then export the final adapter to ``out_dir/adapter``. Returns the metric rows.

    ``tracking``: opens the experiment trackers the caller ends (``fedlora-compare``), called once the
    job is set up; default: the job's own (``cfg.track``), ended here. Either way a job refused in its
    setup (its data, its model) leaves the trackers' files of the run it would replace as they were."""
    opened: list[Tracking | None] = []

    def open_tracking() -> Tracking | None:
        opened.append(tracking() if tracking is not None else Tracking.open(cfg, out_dir, fresh=not resume))
        return opened[-1]

    own = tracking is None
    try:
        job, coord = train(cfg, out_dir, on_step, on_round, schedule, open_tracking, checkpoints, resume)
        export_model(job.fm, coord.state, out_dir / "adapter", job.model_path, job.task.peft_task_type,
                     job.label_names, job.task.name)
    except BaseException:
        if own and opened and opened[0] is not None:
            opened[0].close(failed=True)
        raise
    if opened and opened[0] is not None:
        if own:
            opened[0].finish({"adapter": [out_dir / "adapter"]})
        else:
            opened[0].artifacts("adapter", [out_dir / "adapter"])
    return coord.rows
