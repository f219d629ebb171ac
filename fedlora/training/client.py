"""One deployed client's warm state: its one-slot model, data and sampler.

Built once per run by the ClientApp (see ``clients/app.py``) and kept in memory
between messages, so the base model is loaded once, not per message. Training is
``fedlora.training.train`` with K = 1: the same loop, seeds and batches as that client's
slot in ``fedlora-sim``; with ``--dp sample`` it is Opacus' DP-SGD
(``fedlora.privacy.opacus_dp``) unless ``--dp-backend fedlora``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from fedlora.errors import UserError
from fedlora.job.paths import digest_of
from fedlora.job.schema import JobConfig
from fedlora.job.setup import build_model, client_share, personal_split, prepared
from fedlora.job.warm import Recent, job_key
from fedlora.models.state import (
    apply_global,
    download_from_tensors,
    extract_kept,
    extract_upload,
    upload_tensors,
)
from fedlora.privacy.accounting import sample_budgets
from fedlora.rounds.build import client_strategy
from fedlora.rounds.compress import parse_scheme, upload_codec
from fedlora.strategies import Probe
from fedlora.tasks import get_task
from fedlora.training.sketch import client_sketches
from fedlora.training.train import ClientSampler, TrainConfig, local_training


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


@dataclass
class Examples:
    """A client's encoded examples: ``train`` (``count`` of them) and ``personal`` (held out, or None)."""

    train: object
    personal: object
    count: int


CLIENTS_KEPT = 16
"""Clients whose encoded examples a process keeps (a Ray actor of Flower's simulation rebuilds a
client for each message: its train and evaluate messages of a round find them kept)."""
_EXAMPLES: Recent[Examples] = Recent(CLIENTS_KEPT)


KEEP_ROUNDS = 3
"""Rounds of kept (personal) factors a client holds: a resumed server redoes at most one."""


class LocalClient:
    """A client's model (one slot), training data and fold bookkeeping for one run."""

    def __init__(self, cfg: JobConfig, where: ClientData, label_names: list[str]) -> None:
        self.cfg, self.where = cfg, where
        self.task = get_task(cfg.task)
        self.strategy = client_strategy(cfg)  # its plan, folds and releases: no DP calibration, no defences
        self.rank = cfg.rank_of(where.client_id)
        self.fm, tokenizer, _ = build_model(cfg, [self.rank], self.strategy.plan(1), len(label_names),
                                            label_names)
        #: its own --data's digest (60 bits), sent with each upload: the server refuses another file
        #: from this client later in the run (Coordinator.check_client_data)
        own = digest_of(where.data, names=False) if where.data else None  # a moved copy is the same
        self.data_digest = None if own is None else int(own[:15], 16)
        # the examples, encoded: kept by the process for the next rebuild of this client
        key = (job_key(cfg), own, repr(where), tuple(label_names))
        ex = _EXAMPLES.get(key, lambda: self._encoded(tokenizer, label_names))
        self.train, self.personal = ex.train, ex.personal
        self.sampler = ClientSampler.for_client(cfg, where.client_id, range(ex.count))
        self.folded_through = 0
        self.clip: float | None = None  # --dp sample: the per-example clip the server measured
        self.start: dict[str, Tensor] = {}  # --secagg: the uploaded tensors' values before the last fit
        # factors this client holds between rounds (``<layer>.lora_<F>``): the plan's shared ones
        # (sent once), and its own kept ones by the round that trained them (0: the starting
        # values), so that a round the server redoes (a resumed server) starts from the right ones
        self.held: dict[str, Tensor] = {}
        self.kept: dict[int, dict[str, Tensor]] = {}
        # --compress: the upload's coding, the values it is coded from (this round's global tensors,
        # as the server holds them) and the error-feedback residuals (personal: kept between rounds),
        # by the round whose upload left them, so that a redone round codes from the one before it
        self.codec = upload_codec(cfg, self.strategy)
        self.down = parse_scheme(cfg.compress_down)
        self.reference: dict[str, Tensor] = {}
        self.residuals: dict[int, dict[str, Tensor]] = {}
        # --dp sample: this client's privacy ledger (σ calibrated to its own sampling rate)
        self.budget = (sample_budgets(cfg, [ex.count], self.strategy.init_releases, self.fm.model)[0]
                       if cfg.dp == "sample" else None)

    def _encoded(self, tokenizer, label_names: list[str]) -> Examples:
        """This client's examples, encoded and :func:`prepared`: those it trains on and, with
        ``--personal-test-fraction``, those it holds out to measure its own model."""
        cfg, ds = self.cfg, self._examples(label_names)
        train, test = personal_split(cfg, self.where.client_id, len(ds))
        personal = (prepared(self.task, self.fm, cfg, self.task.eval_set(tokenizer, ds.subset(test), cfg))
                    if test else None)
        ds = ds.subset(train) if test else ds
        return Examples(prepared(self.task, self.fm, cfg, self.task.encode(tokenizer, ds, cfg)), personal,
                        len(ds))

    def _examples(self, label_names: list[str]):
        """This client's examples: its own file (labels renamed to the job's), or its partition."""
        if self.where.data:
            ds = self.task.load(self.where.data, self.cfg)
            return ds.relabel(label_names) if self.task.classes else ds
        if self.where.partition_id is None:
            raise UserError("the client has neither --data nor --partition-id")
        return client_share(self.cfg, self.where.partition_id, self.where.num_partitions)

    def __len__(self) -> int:
        return len(self.sampler)

    def load(self, rnd: int, download: dict[str, Tensor], catch_up: dict[str, Tensor],
             fresh_seed: int | None, scale: float | None = None) -> None:
        """Apply the global state of round ``rnd - 1``: missing folds first, then the state."""
        for t in range(self.folded_through + 1, rnd - 1):
            fold = {k[len(f"t{t}."):].rpartition(".")[0] for k in catch_up if k.startswith(f"t{t}.")}
            if not fold and self.strategy.folds:
                raise ValueError(f"round {rnd}: the server did not send the fold of round {t}")
            for layer in fold:
                self.fm.adapters[layer].fold(catch_up[f"t{t}.{layer}.fold_A"],
                                             catch_up[f"t{t}.{layer}.fold_B"])
        plan = self.strategy.plan(rnd)
        self.fm.set_plan(plan)
        scale = scale or self.cfg.lora_alpha / self.rank  # the global adapter's (FlexLoRA: 1)
        mine = self.kept_before(rnd)
        if mine is not None:  # the client's own kept factors: a re-sent starting value is ignored
            download = {k: t for k, t in download.items() if k.rpartition(".lora_")[2] not in plan.keep}
        else:
            mine = {k: t for k, t in download.items() if k.rpartition(".lora_")[2] in plan.keep}
            if mine:
                self.kept[0] = mine
        self.held.update({k: t for k, t in download.items() if k.rpartition(".lora_")[2] in plan.shared})
        self.reference = {**self.held, **download}
        for kind in (*plan.shared, *plan.keep):
            missing = [k for k in self.fm.adapters if f"{k}.lora_{kind}" not in {**self.held, **mine}]
            if missing:
                raise ValueError(f"the server did not send {missing[0]}.lora_{kind}, which this"
                                 " client does not hold yet")
        state, fold = download_from_tensors(download, scale, {**self.held, **mine})
        if rnd - 1 <= self.folded_through:
            fold = {}
        apply_global(self.fm, state, fold, fresh_seed)
        self.folded_through = max(self.folded_through, rnd - 1)

    def kept_before(self, rnd: int) -> dict[str, Tensor] | None:
        """The kept factors this client starts round ``rnd`` from: those of its latest round
        before ``rnd`` (None when it has none yet)."""
        done = [t for t in self.kept if t < rnd]
        return self.kept[max(done)] if done else None

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
        cfg = TrainConfig.from_job(self.cfg, lone=True, clip=self.clip)
        if self.cfg.secagg:  # the update Δ = θ_k − θ̄ is what SecAgg+ sums (see update)
            before = upload_tensors(extract_upload(self.fm, 0, 1), self.fm.config.plan)
            self.start = {k: t.detach().clone() for k, t in before.items()}
        losses = local_training(self.fm, self.train, [self.sampler], cfg, rnd, self._budgets())
        if self.fm.config.plan.keep:
            self.kept[rnd] = extract_kept(self.fm, 0)
            for old in sorted(self.kept)[:-KEEP_ROUNDS]:
                del self.kept[old]
        up = upload_tensors(extract_upload(self.fm, 0, len(self)), self.fm.config.plan)
        return up, losses[0], time.perf_counter() - t0

    def coded(self, upload: dict[str, Tensor], rnd: int) -> tuple[dict[str, Tensor], tuple[float, float]]:
        """``--compress``: the message that ships round ``rnd``'s upload (:meth:`fit`'s), and
        ``(‖θ̂ − θ‖², ‖θ‖²)`` (see ``fedlora.rounds.compress``). It adds the residual of the last round
        before ``rnd`` and keeps the one it leaves as round ``rnd``'s: a round the server redoes (a
        resumed server) adds the residual its first attempt added, not that attempt's own."""
        earlier = {r: e for r, e in self.residuals.items() if r < rnd}
        residual = earlier[max(earlier)] if earlier else {}
        message, left, error = self.codec.encode(upload, self.reference, residual)
        self.residuals = {r: earlier[r] for r in sorted(earlier)[-1:]}  # the one a redo of rnd needs
        if left:
            self.residuals[rnd] = left
        return message, error

    def update(self, upload: dict[str, Tensor]) -> dict[str, Tensor]:
        """``Δ = θ_k − θ̄``: the last :meth:`fit`'s upload minus the global tensors it started from
        (kept by :meth:`fit` under ``--secagg`` only)."""
        return {k: t - self.start[k] for k, t in upload.items()}

    def evaluate(self) -> dict[str, float]:
        """This client's own model (as loaded: the global state plus what it keeps) on its
        held-out examples: the task's metrics (``accuracy``, ``loss``, ``eval_examples``)."""
        if self.personal is None:
            raise ValueError("this client holds out no examples: the job has no --personal-test-fraction")
        return self.task.evaluate(self.fm, self.personal, self.cfg)

    def gradient(self, probes: dict[str, Probe], phase: int) -> tuple[dict[str, Tensor], float]:
        """Initialisation phase ``phase`` (Fed-SB): ``(<layer>.grad tensors, seconds)``, this
        client's ``Lᵀ G R`` for every probed layer (see ``fedlora.training.sketch``)."""
        t0 = time.perf_counter()
        cfg = TrainConfig.from_job(self.cfg, lone=True)
        got = client_sketches(self.fm, self.train, [self.sampler], cfg, self.cfg.init_batches, probes,
                              self._budgets(), phase)
        return {f"{name}.grad": g[0] for name, g in got.items()}, time.perf_counter() - t0
