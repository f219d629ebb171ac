"""In-process federated run on the batched core: every client of a round in one pass.

Thin glue: data and model from ``fedlora``, aggregation from ``fedlora.strategies``,
the training loop from ``fedlora.train``. One round is

1. every client loads the global state (its slot of the batched model),
2. all clients train ``local_steps`` steps together (one forward/backward per step),
3. each slot's adapter is extracted as that client's upload,
4. the strategy aggregates; the new global state is loaded and evaluated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedlora.data import load_dataset, partition, split, tokenize
from fedlora.export import export_peft
from fedlora.hub import load_model
from fedlora.model import AdapterConfig, FederatedModel
from fedlora.state import (
    apply_global,
    download_tensors,
    extract_upload,
    head_of,
    initial_state,
    upload_tensors,
)
from fedlora.strategies import ClientUpload, GlobalState, Strategy, get_strategy
from fedlora.train import ClientSampler, TrainConfig, estimate_gradients, evaluate, train_clients
from fedlora.wire import tensor_bytes


@dataclass
class SimConfig:
    """One simulated federated job (the ``fedlora-sim`` flags)."""

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

    def client_ranks(self) -> list[int]:
        return list(self.ranks) if self.ranks else [self.rank] * self.num_clients


def make_strategy(cfg: SimConfig) -> Strategy:
    """The configured strategy with its options."""
    options: dict[str, object] = {}
    if cfg.strategy == "lora-fair":
        options["lam"] = cfg.fair_lambda
    elif cfg.strategy == "fed-sb":
        options = {"init_lr": cfg.sb_init_lr, "seed": cfg.seed}
    return get_strategy(cfg.strategy, **options)


@dataclass
class Job:
    """Everything a run needs, built once."""

    cfg: SimConfig
    strategy: Strategy
    fm: FederatedModel
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    samplers: list[ClientSampler]
    model_path: Path
    label_names: list[str]
    gen: torch.Generator


def build_job(cfg: SimConfig) -> Job:
    """Load data and model, partition clients, wrap the model with K client slots."""
    strategy = make_strategy(cfg)
    ds = load_dataset(cfg.data, cfg.text_column,
                      cfg.label_column if cfg.task == "classification" else None)
    train_ds, test_ds = split(ds, cfg.test_fraction, cfg.seed)
    parts = partition(train_ds, cfg.num_clients, cfg.partition, cfg.alpha, cfg.seed)
    num_labels = len(ds.label_names) if cfg.task == "classification" else None
    model, tokenizer, path = load_model(cfg.model, cfg.task, num_labels, seed=cfg.seed)
    adapter_cfg = AdapterConfig(ranks=cfg.client_ranks(), alpha=cfg.lora_alpha,
                                target_modules=cfg.target_modules, mode=strategy.mode,
                                train_head=cfg.task == "classification")
    fm = FederatedModel(model, adapter_cfg).to(torch.device(cfg.device))
    samplers = [ClientSampler(idx, seed=cfg.seed * 100_003 + k) for k, idx in enumerate(parts)]
    return Job(cfg, strategy, fm, tokenize(tokenizer, train_ds, cfg.max_length, cfg.task),
               tokenize(tokenizer, test_ds, cfg.max_length, cfg.task), samplers, path,
               ds.label_names, torch.Generator().manual_seed(cfg.seed))


def train_config(cfg: SimConfig) -> TrainConfig:
    return TrainConfig(task=cfg.task, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                       lr=cfg.lr, max_grad_norm=cfg.max_grad_norm)


def init_round(job: Job) -> tuple[GlobalState, int]:
    """Round 0: the first global state and the bytes clients uploaded for it."""
    cfg, fm = job.cfg, job.fm
    if not job.strategy.needs_gradient_init:
        return initial_state(fm, job.gen, fresh=job.strategy.fresh_adapters), 0
    grads = estimate_gradients(fm, job.train, job.samplers, train_config(cfg), cfg.init_batches)
    uploads = [ClientUpload(num_examples=len(sampler), grads={name: g[k] for name, g in grads.items()})
               for k, sampler in enumerate(job.samplers)]
    bytes_up = sum(tensor_bytes(upload_tensors(u)) for u in uploads)
    state = job.strategy.initialize(uploads, cfg.rank, scale=cfg.lora_alpha / cfg.rank)
    state.head = head_of(fm, 0)
    return state, bytes_up


def run(cfg: SimConfig, out_dir: Path, on_step: Callable[[], None] | None = None,
        on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the job, append one JSON line per round to ``out_dir/metrics.jsonl``,
    export the final adapter to ``out_dir/adapter``. Returns the metric rows."""
    t0 = time.perf_counter()
    job = build_job(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")
    state, bytes_up = init_round(job)
    fold: dict = {}
    apply_global(job.fm, state, fold, job.gen)
    rows = [_row(job, 0, state, bytes_up, 0, float("nan"), None, time.perf_counter() - t0)]
    _emit(metrics_path, rows[-1], on_round)
    for rnd in range(1, cfg.rounds + 1):
        t_round = time.perf_counter()
        down = tensor_bytes(download_tensors(state, fold, with_shared=rnd == 1))
        losses = train_clients(job.fm, job.train, job.samplers, train_config(cfg),
                               progress=on_step)
        uploads = [extract_upload(job.fm, k, len(s)) for k, s in enumerate(job.samplers)]
        up_bytes = [tensor_bytes(upload_tensors(u)) for u in uploads]
        agg = job.strategy.aggregate(uploads, state)
        state, fold = agg.state, agg.fold
        apply_global(job.fm, state, fold, job.gen)
        row = _row(job, rnd, state, up_bytes, down * len(uploads), agg.agg_error, losses,
                   time.perf_counter() - t_round)
        row["bytes_up_per_client"] = up_bytes
        row["bytes_down_per_client"] = down
        rows.append(row)
        _emit(metrics_path, row, on_round)
    heads = list(job.fm.heads)
    export_peft(state, list(job.fm.adapters), out_dir / "adapter", str(job.model_path),
                "SEQ_CLS" if cfg.task == "classification" else "CAUSAL_LM", heads)
    return rows


def _row(job: Job, rnd: int, state: GlobalState, bytes_up, bytes_down: int, agg_error: float,
         losses: list[float] | None, seconds: float) -> dict:
    acc, loss = evaluate(job.fm, job.test, job.cfg.task, job.cfg.eval_batch_size)
    up = sum(bytes_up) if isinstance(bytes_up, list) else bytes_up
    return {
        "round": rnd,
        "strategy": job.strategy.name,
        "accuracy": acc,
        "loss": loss,
        "train_loss": None if losses is None else sum(losses) / len(losses),
        "bytes_up": up,
        "bytes_down": bytes_down,
        "agg_error": None if agg_error != agg_error else agg_error,
        "clients": job.fm.num_clients,
        "seconds": round(seconds, 3),
    }


def _emit(path: Path, row: dict, on_round: Callable[[dict], None] | None) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    if on_round is not None:
        on_round(row)
