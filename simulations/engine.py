"""In-process federated run on the batched core: every client of a round in one pass.

Thin glue: data and model from ``fedlora``, the server side of a round from
:class:`fedlora.rounds.Coordinator` (shared with ``fedlora-server``), the training
loop from ``fedlora.train``. One round is

1. every client loads the global state (its slot of the batched model),
2. all clients train ``local_steps`` steps together (one forward/backward per step),
3. each slot's adapter is extracted as that client's upload,
4. the coordinator aggregates; the new global state is loaded and evaluated.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from fedlora.config import JobConfig
from fedlora.data import partition
from fedlora.export import export_peft
from fedlora.model import FederatedModel
from fedlora.privacy import Budget, sample_budgets
from fedlora.rounds import Coordinator, make_strategy, personal_columns
from fedlora.setup import build_model, personal_split, public_data, splits
from fedlora.simulations.attacks import Attack, attack_uploads
from fedlora.sketch import client_sketches
from fedlora.state import extract_kept, extract_upload, load_kept, probe_tensors, upload_tensors
from fedlora.strategies import ClientUpload, Probe, Strategy
from fedlora.tasks import Task, get_task
from fedlora.train import ClientSampler, TrainConfig, local_training
from fedlora.wire import tensor_bytes

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
    budgets: list[Budget] | None = None  # --dp sample: one privacy ledger per client
    personal: list[object] | None = None  # --personal-test-fraction: each client's own test set
    public: dict[str, torch.Tensor] | None = None  # --init-data, encoded


def build_job(cfg: JobConfig) -> Job:
    """Load data and model, partition clients, wrap the model with one slot per client of a pass."""
    task, strategy = get_task(cfg.task), make_strategy(cfg)
    train_ds, test_ds, label_names = splits(cfg, task)
    parts = partition(train_ds, cfg.num_clients, cfg.partition, cfg.alpha, cfg.seed)
    held = [personal_split(cfg, k, len(idx)) for k, idx in enumerate(parts)]
    slots = pass_size(cfg, len(cfg.sampled(1)))
    fm, tokenizer, path = build_model(cfg, [max(cfg.client_ranks())] * slots, strategy.plan(1),
                                      len(label_names))
    samplers = [ClientSampler.for_client(cfg, k, [idx[i] for i in train])
                for k, (idx, (train, _)) in enumerate(zip(parts, held, strict=True))]
    budgets = (sample_budgets(cfg, [len(s) for s in samplers], strategy.init_releases, fm.model)
               if cfg.dp == "sample" else None)
    personal = None
    if cfg.personal_test_fraction:
        personal = [task.eval_set(tokenizer, train_ds.subset([idx[i] for i in test]), cfg)
                    for idx, (_, test) in zip(parts, held, strict=True)]
    return Job(cfg, task, strategy, fm, task.encode(tokenizer, train_ds, cfg),
               task.eval_set(tokenizer, test_ds, cfg), samplers, path, label_names, budgets, personal,
               public_data(cfg, task, tokenizer, label_names))


#: CPU passes hold about this many tokens (rows × ``--max-length``): per token, a CPU step is
#: fastest at a few thousand tokens and slower in larger passes (``benchmarks/pass_size.py``).
CPU_PASS_TOKENS = 4096
#: GPU activation memory of one client's step per token (``batch × max_length``), in bytes,
#: with a margin; ``benchmarks/pass_size.py --device cuda`` measures it.
GPU_BYTES_PER_TOKEN = 4 * 4096 * 24


def pass_size(cfg: JobConfig, clients: int) -> int:
    """Clients per forward/backward: 1 for ``--dp-backend opacus``, else ``--max-clients-per-pass``,
    else on CPU as many as fill :data:`CPU_PASS_TOKENS`, else as many as half the free GPU
    memory holds at :data:`GPU_BYTES_PER_TOKEN`."""
    if cfg.dp == "sample" and cfg.dp_backend_for(lone=False) == "opacus":
        return 1  # Opacus' DP-SGD is one client at a time
    if cfg.max_clients_per_pass:
        return min(cfg.max_clients_per_pass, clients)
    tokens = cfg.batch_size * cfg.max_length  # one client's rows of one step, at most
    if not cfg.device.startswith("cuda"):
        return max(1, min(clients, CPU_PASS_TOKENS // tokens))
    free, _ = torch.cuda.mem_get_info(torch.device(cfg.device))
    return max(1, min(clients, int(0.5 * free // (tokens * GPU_BYTES_PER_TOKEN))))


def chunks(clients: list[int], size: int) -> list[list[int]]:
    return [clients[i:i + size] for i in range(0, len(clients), size)]


def local_round(job: Job, coord: Coordinator, rnd: int, clients: list[int],
                on_step: Callable[[int], None] | None) -> tuple[list[ClientUpload], list[float]]:
    """Train ``clients`` pass by pass from the global state; their uploads and losses."""
    uploads, losses = [], []
    for chunk in chunks(clients, job.fm.num_clients):
        pad = [job.cfg.rank_of(chunk[0])] * (job.fm.num_clients - len(chunk))
        job.fm.set_ranks([job.cfg.rank_of(c) for c in chunk] + pad)
        coord.reload()
        for k, c in enumerate(chunk):  # what each client kept from its last round (plan's keep)
            if c in coord.personal:
                load_kept(job.fm, k, coord.personal[c])
        step = None if on_step is None else partial(on_step, len(chunk))
        losses += local_training(job.fm, job.train, [job.samplers[c] for c in chunk],
                                 TrainConfig.from_job(job.cfg, clip=coord.clip), rnd, _budgets(job, chunk),
                                 step)
        uploads += [extract_upload(job.fm, k, len(job.samplers[c])) for k, c in enumerate(chunk)]
        if job.fm.config.plan.keep:
            coord.personal.update({c: extract_kept(job.fm, k) for k, c in enumerate(chunk)})
    return uploads, losses


def personal_evaluation(job: Job, coord: Coordinator, clients: list[int]) -> dict:
    """``--personal-test-fraction``: each client's own model (the global state plus what it
    kept) on its own held-out examples, combined by :func:`fedlora.rounds.personal_columns`.
    Slot 0 takes the client's rank first: FlexLoRA's clients start from their own rank's
    truncation of the global update."""
    if job.personal is None:
        return {}
    results = []
    for c in clients:
        job.fm.set_ranks([job.cfg.rank_of(c)] * job.fm.num_clients)
        coord.reload()
        if c in coord.personal:
            load_kept(job.fm, 0, coord.personal[c])
        results.append(job.task.evaluate(job.fm, job.personal[c], job.cfg))
    coord.reload()
    return personal_columns(results)


def init_uploads(job: Job, clients: list[int], probes: dict[str, Probe], phase: int) -> list[ClientUpload]:
    """One initialisation phase (Fed-SB): every client's ``Lᵀ G_k R``, pass by pass."""
    out = []
    for chunk in chunks(clients, job.fm.num_clients):
        got = client_sketches(job.fm, job.train, [job.samplers[c] for c in chunk],
                              TrainConfig.from_job(job.cfg), job.cfg.init_batches, probes,
                              _budgets(job, chunk), phase)
        out += [ClientUpload(num_examples=len(job.samplers[c]),
                             grads={name: g[k] for name, g in got.items()}) for k, c in enumerate(chunk)]
    return out


def _budgets(job: Job, clients: list[int]) -> list[Budget] | None:
    return None if job.budgets is None else [job.budgets[c] for c in clients]


def privacy_columns(budgets: list[Budget] | None, clients: list[int], backend: str) -> dict:
    """``--dp sample`` metric columns: ε spent by each client of the round, the largest, and
    who computed DP-SGD (``backend``: fedlora or opacus)."""
    if budgets is None:
        return {}
    return {"dp": "sample", "dp_backend": backend,
            "epsilon_per_client": [round(budgets[c].spent, 4) for c in clients],
            "epsilon": round(max(b.spent for b in budgets), 4),
            "noise_multiplier": max(b.sigma for b in budgets)}


class InitBytes:
    """The simulator's ``gather`` of initialisation phases, counting each client's bytes up
    (its uploads) and down (the probes) over the phases."""

    def __init__(self, job: Job, clients: list[int]) -> None:
        self.job, self.clients = job, clients
        self.up: list[int] = []
        self.down: list[int] = []

    def __call__(self, phase: int, probes: dict[str, Probe]) -> list[ClientUpload]:
        ups = init_uploads(self.job, self.clients, probes, phase)
        sizes = [tensor_bytes(upload_tensors(u, self.job.strategy.plan(1))) for u in ups]
        sent = [tensor_bytes(probe_tensors(probes))] * len(ups)
        self.up = [a + b for a, b in zip(self.up or [0] * len(ups), sizes, strict=True)]
        self.down = [a + b for a, b in zip(self.down or [0] * len(ups), sent, strict=True)]
        return ups


class _Bytes:
    """Bytes down per client, serialising each distinct payload once per round."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord, self.cache = coord, {}

    def __call__(self, client: int) -> int:
        folded = self.coord.synced.get(client, 0)
        key = (self.coord.round, folded, client in self.coord.has_shared)
        if key not in self.cache:
            down, catch = self.coord.payload(client)
            self.cache[key] = tensor_bytes(down) + tensor_bytes(catch)
        return self.cache[key]


def run(cfg: JobConfig, out_dir: Path, on_step: Callable[[int], None] | None = None,
        on_round: Callable[[dict], None] | None = None,
        schedule: Callable[[int], list[int]] | None = None) -> list[dict]:
    """Run the job, append one JSON line per round to ``out_dir/metrics.jsonl``,
    export the final adapter to ``out_dir/adapter``. Returns the metric rows.

    ``schedule``: round -> its clients, in place of ``cfg.sampled`` (to replay the participation
    of a deployed run, whose clients may have died: ``benchmarks/load.py``)."""
    t0 = time.perf_counter()
    job = build_job(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")
    coord = Coordinator(cfg, job.strategy, job.fm, job.test, job.public)
    init = InitBytes(job, cfg.sampled(0))
    coord.start(init)
    row0 = coord.row(init.up, init.down, None, None, time.perf_counter() - t0, len(init.up))
    row0.update(privacy_columns(job.budgets, cfg.sampled(0) if init.up else [], cfg.dp_backend_for(False)))
    _emit(metrics_path, row0, on_round)
    attack = Attack.parse(cfg.attack) if cfg.attack else None
    for rnd in range(1, cfg.rounds + 1):
        t_round = time.perf_counter()
        clients = (schedule or cfg.sampled)(rnd)
        if job.budgets is not None:  # clients whose privacy budget is spent sit out
            clients = [c for c in clients if job.budgets[c].can_step()]
            if not clients:
                print(f"fedlora: every client of round {rnd} has spent its privacy budget"
                      f" (ε={cfg.epsilon:g}); stopping after round {rnd - 1}", file=sys.stderr)
                break
        down = [_Bytes(coord)(c) for c in clients]
        plan = coord.plan
        ups, losses = local_round(job, coord, rnd, clients, on_step)
        ups = attack_uploads(ups, clients, attack, cfg.attackers, coord.state, plan)
        for c in clients:
            coord.delivered(c)
        agg = coord.aggregate(ups)
        row = coord.row([tensor_bytes(upload_tensors(u, plan)) for u in ups], down, agg.agg_error, losses,
                        time.perf_counter() - t_round, len(ups))
        row.update(privacy_columns(job.budgets, clients, cfg.dp_backend_for(False)))
        row.update(personal_evaluation(job, coord, clients))
        _emit(metrics_path, row, on_round)
    export_peft(coord.state, list(job.fm.adapters), out_dir / "adapter", job.model_path,
                job.task.peft_task_type, list(job.fm.heads))
    return coord.rows


def _emit(path: Path, row: dict, on_round: Callable[[dict], None] | None) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    if on_round is not None:
        on_round(row)
