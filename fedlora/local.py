"""One deployed client's warm state: its one-slot model, data and sampler.

Built once per run by the ClientApp (see ``clients/app.py``) and kept in memory
between messages, so the base model is loaded once, not per message. Training is
``fedlora.train`` with K = 1: the same loop, seeds and batches as that client's
slot in ``fedlora-sim``; with ``--dp sample`` it is Opacus' DP-SGD
(``fedlora.opacus_dp``) unless ``--dp-backend fedlora``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.config import JobConfig
from fedlora.data import load_dataset, partition, split, tokenize
from fedlora.errors import UserError
from fedlora.hub import load_model
from fedlora.model import AdapterConfig, FederatedModel
from fedlora.privacy import sample_budgets
from fedlora.rounds import make_strategy
from fedlora.state import apply_global, download_from_tensors, extract_upload, upload_tensors
from fedlora.strategies.base import Factors
from fedlora.train import gradient_estimates, local_training


@dataclass
class ClientData:
    """Where a client's examples come from (its SuperNode's node config)."""

    client_id: int = 0
    partition_id: int | None = None
    num_partitions: int | None = None
    data: str | None = None

    @classmethod
    def from_node_config(cls, node_config: dict) -> ClientData:
        pid = node_config.get("partition-id")
        return cls(client_id=int(node_config.get("client-id", pid if pid is not None else 0)),
                   partition_id=None if pid is None else int(pid),
                   num_partitions=None if pid is None else int(node_config.get("num-partitions", 1)),
                   data=node_config.get("data") or None)


class LocalClient:
    """A client's model (one slot), training data and fold bookkeeping for one run."""

    def __init__(self, cfg: JobConfig, where: ClientData, label_names: list[str]) -> None:
        self.cfg, self.where = cfg, where
        self.strategy = make_strategy(cfg)
        classify = cfg.task == "classification"
        model, tokenizer, _ = load_model(cfg.model, cfg.task, len(label_names) if classify else None,
                                         seed=cfg.seed)
        self.rank = cfg.rank_of(where.client_id)
        self.fm = FederatedModel(model, AdapterConfig(
            ranks=[self.rank], alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
            mode=self.strategy.mode, train_head=classify)).to(torch.device(cfg.device))
        ds = self._examples(label_names)
        self.train = tokenize(tokenizer, ds, cfg.max_length, cfg.task)
        self.sampler = cfg.sampler(where.client_id, range(len(ds)))
        self.folded_through = 0
        self.shared: dict[str, Factors] | None = None
        # --dp sample: this client's privacy ledger (σ calibrated to its own sampling rate)
        self.budget = sample_budgets(cfg, [len(ds)], model)[0] if cfg.dp == "sample" else None

    def _examples(self, label_names: list[str]):
        cfg, where = self.cfg, self.where
        label_col = cfg.label_column if cfg.task == "classification" else None
        if where.data:
            ds = load_dataset(where.data, cfg.text_column, label_col)
            return ds.relabel(label_names) if label_col else ds
        if where.partition_id is None:
            raise UserError("the client has neither --data nor --partition-id")
        train_ds, _ = split(load_dataset(cfg.data, cfg.text_column, label_col), cfg.test_fraction,
                            cfg.seed)
        parts = partition(train_ds, where.num_partitions, cfg.partition, cfg.alpha, cfg.seed)
        if not 0 <= where.partition_id < len(parts):
            raise UserError(f"partition-id {where.partition_id} is not in 0..{len(parts) - 1}")
        return train_ds.subset(parts[where.partition_id])

    def __len__(self) -> int:
        return len(self.sampler)

    def load(self, rnd: int, download: dict[str, Tensor], catch_up: dict[str, Tensor],
             fresh_seed: int | None) -> None:
        """Apply the global state of round ``rnd - 1``: missing folds first, then the state."""
        for t in range(self.folded_through + 1, rnd - 1):
            fold = {k[len(f"t{t}."):].rpartition(".")[0] for k in catch_up if k.startswith(f"t{t}.")}
            if not fold and self.strategy.fresh_adapters:
                raise ValueError(f"round {rnd}: the server did not send the fold of round {t}")
            for layer in fold:
                self.fm.adapters[layer].fold(catch_up[f"t{t}.{layer}.fold_A"],
                                             catch_up[f"t{t}.{layer}.fold_B"])
        scale = self.cfg.lora_alpha / self.cfg.rank
        state, fold = download_from_tensors(download, scale, self.shared)
        if rnd - 1 <= self.folded_through:
            fold = {}
        if self.strategy.mode == "lora-sb":
            if state.factors is None:
                raise ValueError("the server sent LoRA-SB cores without the shared factors")
            self.shared = state.factors
        apply_global(self.fm, state, fold, fresh_seed)
        self.folded_through = max(self.folded_through, rnd - 1)

    def _budgets(self):
        return None if self.budget is None else [self.budget]

    @property
    def epsilon(self) -> float:
        """ε spent so far (0 without --dp sample)."""
        return 0.0 if self.budget is None else self.budget.spent

    def fit(self, rnd: int) -> tuple[dict[str, Tensor], float, float]:
        """Train round ``rnd``: ``(upload tensors, mean train loss, seconds)``."""
        t0 = time.perf_counter()
        if self.budget is not None and not self.budget.can_step():
            raise RuntimeError(f"this client's privacy budget ε={self.budget.epsilon:g} is spent"
                               f" ({self.budget.spent:.3f} after {self.budget.steps} steps)")
        losses = local_training(self.fm, self.train, [self.sampler], self.cfg.train_config(lone=True), rnd,
                                self._budgets())
        up = upload_tensors(extract_upload(self.fm, 0, len(self)))
        return up, losses[0], time.perf_counter() - t0

    def gradient(self) -> tuple[dict[str, Tensor], float]:
        """Fed-SB round 0: ``(<layer>.grad tensors, seconds)``."""
        t0 = time.perf_counter()
        grads = gradient_estimates(self.fm, self.train, [self.sampler], self.cfg.train_config(lone=True),
                                   self.cfg.init_batches, self._budgets())
        return {f"{name}.grad": g[0] for name, g in grads.items()}, time.perf_counter() - t0
