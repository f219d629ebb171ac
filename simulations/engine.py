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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedlora.config import JobConfig
from fedlora.data import load_dataset, partition, split, tokenize
from fedlora.export import export_peft
from fedlora.hub import load_model
from fedlora.model import AdapterConfig, FederatedModel
from fedlora.rounds import Coordinator, make_strategy
from fedlora.state import extract_upload, upload_tensors
from fedlora.strategies import ClientUpload, Strategy
from fedlora.train import ClientSampler, estimate_gradients, train_clients
from fedlora.wire import tensor_bytes

SimConfig = JobConfig  # the simulator's name for a job's settings

__all__ = ["Job", "SimConfig", "build_job", "run"]


@dataclass
class Job:
    """Everything a run needs, built once."""

    cfg: JobConfig
    strategy: Strategy
    fm: FederatedModel
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    samplers: list[ClientSampler]
    model_path: Path
    label_names: list[str]


def build_job(cfg: JobConfig) -> Job:
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
    samplers = [cfg.sampler(k, idx) for k, idx in enumerate(parts)]
    return Job(cfg, strategy, fm, tokenize(tokenizer, train_ds, cfg.max_length, cfg.task),
               tokenize(tokenizer, test_ds, cfg.max_length, cfg.task), samplers, path,
               ds.label_names)


def init_uploads(job: Job) -> list[ClientUpload]:
    """Fed-SB's round 0: every client's gradient estimate."""
    grads = estimate_gradients(job.fm, job.train, job.samplers, job.cfg.train_config(),
                               job.cfg.init_batches)
    return [ClientUpload(num_examples=len(sampler), grads={name: g[k] for name, g in grads.items()})
            for k, sampler in enumerate(job.samplers)]


def run(cfg: JobConfig, out_dir: Path, on_step: Callable[[], None] | None = None,
        on_round: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the job, append one JSON line per round to ``out_dir/metrics.jsonl``,
    export the final adapter to ``out_dir/adapter``. Returns the metric rows."""
    t0 = time.perf_counter()
    job = build_job(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")
    coord = Coordinator(cfg, job.strategy, job.fm, job.test)
    uploads = init_uploads(job) if job.strategy.needs_gradient_init else None
    coord.start(uploads)
    up0 = [tensor_bytes(upload_tensors(u)) for u in uploads or []]
    _emit(metrics_path, coord.row(up0, [], None, None, time.perf_counter() - t0, len(up0)), on_round)
    for rnd in range(1, cfg.rounds + 1):
        t_round = time.perf_counter()
        down = tensor_bytes(coord.download(with_shared=rnd == 1))
        losses = train_clients(job.fm, job.train, job.samplers, cfg.train_config(),
                               progress=on_step, rnd=rnd)
        ups = [extract_upload(job.fm, k, len(s)) for k, s in enumerate(job.samplers)]
        agg = coord.aggregate(ups)
        row = coord.row([tensor_bytes(upload_tensors(u)) for u in ups], [down] * len(ups),
                        agg.agg_error, losses, time.perf_counter() - t_round, len(ups))
        _emit(metrics_path, row, on_round)
    export_peft(coord.state, list(job.fm.adapters), out_dir / "adapter", str(job.model_path),
                "SEQ_CLS" if cfg.task == "classification" else "CAUSAL_LM", list(job.fm.heads))
    return coord.rows


def _emit(path: Path, row: dict, on_round: Callable[[dict], None] | None) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    if on_round is not None:
        on_round(row)
