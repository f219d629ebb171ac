"""The server side of a federated job, shared by the simulator and the Flower ServerApp.

A :class:`Coordinator` owns the global state and everything that must be identical
in ``fedlora-sim`` and ``fedlora-server``: the initial state, the order in which
the seed generator is used (FLoRA's fresh adapters), what is sent down each round,
aggregation, the metric row of a round, and checkpoints. Its model ``fm`` is the
one the global state is loaded into and evaluated with (the simulator's batched
model, or the ServerApp's one-slot model).

Round t (t ≥ 1): clients load :meth:`download` (the global state after round t-1,
plus FLoRA's fold of round t-1 and ``fresh_seed``), train, upload; :meth:`aggregate`
makes the state of round t. Round 0 is the initial state; for Fed-SB it is built
by initialisation phases over the clients' data (:meth:`start` with a ``gather``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from fedlora.checks import check_dp_args
from fedlora.config import DP_RECIPE, JobConfig, measures_clip
from fedlora.errors import UserError
from fedlora.model import FederatedModel, draw_seed
from fedlora.privacy import Budget, GaussianNoise
from fedlora.public import measure_clip, public_uploads, train_head, warm_start
from fedlora.state import apply_global, download_tensors, exact_global, head_of, initial_state
from fedlora.strategies import (
    Aggregate,
    ClientLevelDP,
    ClientUpload,
    GlobalState,
    Strategy,
    strategy_class,
)
from fedlora.strategies.base import Factors, Probe
from fedlora.strategies.plan import AdapterPlan
from fedlora.strategies.robust import Robust
from fedlora.tasks import get_task

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
Gather = Callable[[int, dict[str, Probe]], list[ClientUpload]]
"""``gather(phase, probes)``: the clients' uploads of one initialisation phase."""


def make_strategy(cfg: JobConfig) -> Strategy:
    """The configured strategy with its options (``Strategy.from_job``), wrapped for
    ``--dp client`` and for the server's weights and robust aggregation (:class:`Robust`, when
    any of its flags is set); a bad name, option or combination is a one-line :class:`UserError`."""
    try:
        strategy = strategy_class(cfg.strategy).from_job(cfg)
    except ValueError as exc:
        raise UserError(f"--strategy {cfg.strategy}: {exc}") from None
    strategy = client_level_dp(cfg, strategy) if cfg.dp == "client" else strategy
    try:
        robust = Robust(strategy, cfg.weighting, cfg.max_examples, cfg.norm_bound, cfg.robust_mean,
                        cfg.trim)
    except ValueError as exc:
        raise UserError(f"--strategy {cfg.strategy}: {exc}") from None
    return robust if robust.active else strategy


def client_level_dp(cfg: JobConfig, inner: Strategy) -> ClientLevelDP:
    """``inner`` wrapped for ``--dp client``, with its privacy ledger.

    ``m = len(cfg.sampled(1))`` clients per round sampled at rate ``q = m / num_clients``;
    the planned releases are the rounds (plus Fed-SB's initialisation); ``σ`` is
    ``--noise-multiplier`` or calibrated to spend ``(ε, δ)`` over them; ``C`` is
    ``--update-clip``. A fixed ``σ`` that cannot afford every planned round is refused
    here, before anything is trained.

    Raises
    ------
    UserError
        Non-sum strategy, missing ε, bad δ or clip, or a ``σ`` too small for the rounds.
    """
    check_dp_args(cfg)  # the flags' checks: the Flower run-config path never parses flags
    m = len(cfg.sampled(1))
    init = inner.init_releases
    steps = cfg.rounds + init
    budget = Budget.planned(cfg.epsilon, cfg.delta, m / cfg.num_clients, steps, cfg.noise_multiplier)
    budget.refuse_costly_init(init, f"{init} release(s)")
    if not budget.affords(steps):
        raise UserError(_too_little_noise(budget, steps, steps - cfg.rounds))
    return ClientLevelDP(inner, clip=cfg.update_clip, noise_multiplier=budget.sigma,
                         expected_clients=m, seed=cfg.seed, accountant=budget.epsilon_after,
                         epsilon=cfg.epsilon,
                         noise=lambda step: GaussianNoise(cfg.dp_reproducible, cfg.seed, step, 0xC1))


def _too_little_noise(budget: Budget, steps: int, extra: int) -> str:
    """The refusal of a fixed σ that spends ε before the last planned round."""
    lo, hi = 0, steps       # largest affordable number of releases, by bisection (ε grows)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budget.affords(mid):
            lo = mid
        else:
            hi = mid - 1
    rounds = max(lo - extra, 0)
    fix = f"pass --rounds {rounds}, " if rounds else "pass "
    return (f"--noise-multiplier {budget.sigma:g} spends the privacy budget ε={budget.epsilon:g} before"
            f" the last round (ε={budget.epsilon_after(steps):.3g} after {steps - extra} rounds); it"
            f" affords {rounds} rounds: {fix}a larger --noise-multiplier, or none to calibrate σ"
            " to --epsilon")


class Coordinator:
    """Global state, fold history and seeds of one job (see the module docstring)."""

    def __init__(self, cfg: JobConfig, strategy: Strategy, fm: FederatedModel, test: object,
                 public: dict[str, Tensor] | None = None) -> None:
        self.cfg, self.strategy, self.fm, self.test = cfg, strategy, fm, test
        self.public = public                         # --init-data, encoded for the task
        self.task = get_task(cfg.task)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.state: GlobalState | None = None
        self.folds: list[dict[str, Factors]] = []    # folds[t-1]: fold of round t
        self.round = 0                               # last completed round
        self.fresh_seed: int | None = None           # FLoRA: adapters of the next round
        self.rows: list[dict] = []
        self.synced: dict[object, int] = {}          # client -> last round whose fold it applied
        self.has_shared: set[object] = set()         # clients holding the plan's shared/kept factors
        self.personal: dict[object, dict[str, Tensor]] = {}  # simulated clients' kept factors
        self.metrics: dict = {}                      # the last aggregate's own columns
        self.clip: float | None = None               # --dp sample: the clip measured on --init-data

    # ---- state ----
    def start(self, gather: Gather | None = None) -> None:
        """Round 0: the initial global state, after the strategy's initialisation phases.

        Phase p sends the strategy's probes to the clients, ``gather(p, probes)`` returns their
        uploads, the strategy reduces them; with ``--init-data`` the phases run here on the
        public file instead (no upload, no privacy cost).
        """
        shapes = {name: tuple(layer.base.weight.shape) for name, layer in self.fm.adapters.items()}
        carry: dict = {}
        for phase in range(self.strategy.init_phases):
            probes = self.strategy.init_probes(phase, shapes, self.cfg.rank, carry)
            if self.strategy.public_init and self.public is None:
                raise ValueError("a public initialisation needs the --init-data examples")
            uploads = (public_uploads(self.fm, self.public, self.cfg, probes)
                       if self.strategy.public_init else gather(phase, probes))
            if not uploads:
                raise ValueError(f"{self.strategy.name}'s initialisation needs the clients' uploads")
            self._check_budget()
            carry = self.strategy.init_reduce(phase, uploads, carry)
        state = self.strategy.initialize(carry, self.cfg.rank, self.cfg.lora_alpha / self.cfg.rank, shapes)
        if state is None:
            state = initial_state(self.fm, self.gen, fresh=self.plan.start == "fresh")
        else:
            state.head = head_of(self.fm, 0)
        self.state = state
        self.state.round = 0
        self._load({})
        self._public_start()

    def _public_start(self) -> None:
        """What the server does with the public ``--init-data`` file (:mod:`fedlora.public`), in
        this order: the head, the adapters' warm start, the clip measured at the result."""
        if self.public is None:
            if self.cfg.head == "public" or self.cfg.public_steps or measures_clip(self.cfg):
                raise ValueError("--head public, --public-steps and a measured clip need the"
                                 " --init-data examples")
            return
        assert self.state is not None
        if self.cfg.head == "public":
            self.state.head = train_head(self.fm, self.public, self.cfg, self.plan)
            self._load({})
        if self.cfg.public_steps:
            self.state = warm_start(self.fm, self.public, self.cfg, self.strategy, self.state)
            self.state.round = 0
            self._load({})
        if measures_clip(self.cfg):
            self.clip = measure_clip(self.fm, self.public, self.cfg)

    def _load(self, fold: dict[str, Factors]) -> None:
        assert self.state is not None
        self.fm.set_plan(self.plan)
        fresh = self.state.factors is None and self.plan.start == "fresh"
        self.fresh_seed = draw_seed(self.gen) if fresh else None
        apply_global(self.fm, self.state, fold, self.fresh_seed)

    @property
    def plan(self) -> AdapterPlan:
        """The adapter plan of the next round."""
        return self.strategy.plan(self.round + 1)

    def reload(self) -> None:
        """Load the current global state into every slot again (no fold): the next pass
        of the same round starts from where the previous one did."""
        assert self.state is not None
        apply_global(self.fm, self.state, {}, self.fresh_seed)

    def aggregate(self, uploads: list[ClientUpload]) -> Aggregate:
        """Round ``self.round + 1``: aggregate, load the new state into ``fm``."""
        assert self.state is not None
        self._check_budget()
        return self._advance(self.strategy.aggregate(uploads, self.state))

    def aggregate_mean(self, mean: ClientUpload, clients: int) -> Aggregate:
        """Round ``self.round + 1`` from the clients' weighted mean upload alone (``--secagg``)."""
        assert self.state is not None
        self._check_budget()
        return self._advance(self.strategy.aggregate_mean(mean, clients, self.state))

    def _advance(self, agg: Aggregate) -> Aggregate:
        self.state = agg.state
        self.folds.append(agg.fold)
        self.round += 1
        self.state.round = self.round
        self.metrics = dict(agg.metrics)
        self._load(agg.fold)
        return agg

    def _check_budget(self) -> None:
        """``--dp client``: refuse a release past the ε budget (more rounds than planned)."""
        if not self.strategy.can_step():
            raise UserError(f"the privacy budget ε={self.cfg.epsilon:g} is spent after round"
                            f" {self.round}: one more round would exceed it; stop here or start"
                            " a job with a larger --epsilon")

    @property
    def fold(self) -> dict[str, Factors]:
        """The fold of the last completed round (empty before round 1 or without folds)."""
        return self.folds[-1] if self.folds else {}

    def download(self, first: bool) -> dict[str, Tensor]:
        """What every client of the next round receives (see ``state.download_tensors``);
        ``first``: with the plan's shared factors and the kept ones' starting values."""
        assert self.state is not None
        return download_tensors(self.state, self.fold, self.plan, first)

    @property
    def holds_state(self) -> bool:
        """Whether clients hold factors between rounds (the plan's shared or kept ones)."""
        return bool(self.plan.shared or self.plan.keep)

    def payload(self, client) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """What ``client`` (any key: a client id, a node id) receives for the next round:
        ``(download, catch-up folds)``."""
        first = self.holds_state and client not in self.has_shared
        return self.download(first=first), self.catch_up(self.synced.get(client, 0))

    def delivered(self, client) -> None:
        """``client`` replied to the current round: it holds the state of ``self.round``."""
        self.synced[client] = self.round
        if self.holds_state:
            self.has_shared.add(client)

    def forget(self, client) -> None:
        """``client`` failed: assume nothing about what it applied."""
        self.synced.pop(client, None)
        self.has_shared.discard(client)

    def catch_up(self, folded_through: int) -> dict[str, Tensor]:
        """Folds a client that has applied rounds ≤ ``folded_through`` still misses,
        except the last one (which is in :meth:`download`): ``t<round>.<layer>.fold_A/B``."""
        out: dict[str, Tensor] = {}
        for t in range(folded_through + 1, self.round):
            for layer, (A, B) in self.folds[t - 1].items():
                out[f"t{t}.{layer}.fold_A"], out[f"t{t}.{layer}.fold_B"] = A, B
        return out

    # ---- metrics ----
    def row(self, bytes_up: list[int], bytes_down: list[int], agg_error: float | None,
            losses: list[float] | None, train_seconds: float, clients: int) -> dict:
        """The metric row of the last completed round: evaluates ``fm`` with the task's metrics.

        ``train_seconds``: the round's time so far (training, transfers, aggregation; setup for
        round 0); ``eval_seconds`` is timed here, and ``seconds`` is their sum, the round's wall time.
        """
        t0 = time.perf_counter()
        with exact_global(self.fm, self.state):
            metrics = self.task.evaluate(self.fm, self.test, self.cfg)
        eval_seconds = time.perf_counter() - t0
        row = {
            "round": self.round,
            "strategy": self.strategy.name,
            "accuracy": metrics.pop("accuracy"),
            "loss": metrics.pop("loss"),
            "metric": self.task.metric,
            **metrics,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "bytes_up": sum(bytes_up),
            "bytes_down": sum(bytes_down),
            "bytes_up_per_client": list(bytes_up),
            "bytes_down_per_client": list(bytes_down),
            "agg_error": None if agg_error is None or agg_error != agg_error else agg_error,
            "clients": clients,
            "train_seconds": round(train_seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            "seconds": round(train_seconds + eval_seconds, 3),
            **(self.metrics if self.round else {}),
        }
        if self.cfg.dp == "sample":  # the per-example clip: given, or measured on --init-data
            row["max_grad_norm"] = self.cfg.max_grad_norm or self.clip
        row.update(self.strategy.round_report())  # --dp client's ledger, the defences' counts
        self.rows.append(row)
        return row

    # ---- checkpoints ----
    def save(self, out_dir: Path) -> Path:
        """Write ``checkpoint.pt`` atomically (temp file, fsync, rename)."""
        blob = {"config": asdict(self.cfg), "round": self.round, "state": self.state,
                "folds": self.folds, "gen": self.gen.get_state(), "fresh_seed": self.fresh_seed,
                "rows": self.rows, "personal": self.personal, "clip": self.clip}
        path = out_dir / CHECKPOINT
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(blob, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def restore(self, path: Path) -> None:
        """Continue after the round saved in ``path``: base folds, state and seeds."""
        blob = torch.load(path, weights_only=False)
        self.round, self.state, self.folds = blob["round"], blob["state"], blob["folds"]
        self.rows = blob["rows"]
        self.gen.set_state(blob["gen"])
        for fold in self.folds:
            for name, (A, B) in fold.items():
                self.fm.adapters[name].fold(A, B)
        self.fresh_seed = blob["fresh_seed"]
        self.personal = blob.get("personal", {})
        self.clip = blob.get("clip")
        if self.clip is None and measures_clip(self.cfg):
            # written before the clip was measured: its clients clipped at the recipe's clip; keep it
            self.clip = DP_RECIPE["max_grad_norm"]
            log.warning("%s has no measured clip (written by an older fedlora): its clients clipped at"
                        " %g and the resumed rounds do too", path, self.clip)
        self.strategy.resume(self.round)  # --dp client: releases so far
        self.fm.set_plan(self.plan)
        apply_global(self.fm, self.state, {}, self.fresh_seed)


def personal_columns(results: list[dict]) -> dict:
    """``personal_accuracy``: the clients' own-model metric (each client's ``accuracy`` on its
    held-out examples), averaged with weights ``eval_examples``; ``personal_examples`` their sum."""
    n = sum(int(r["eval_examples"]) for r in results)
    if not n:
        return {}
    acc = sum(float(r["accuracy"]) * int(r["eval_examples"]) for r in results) / n
    return {"personal_accuracy": acc, "personal_examples": n, "personal_clients": len(results)}


METRIC_LABELS = {"accuracy": "acc", "answer_accuracy": "answer acc", "token_accuracy": "token acc"}


def format_row(row: dict) -> str:
    """One round as a line: the task's headline metric, loss (and perplexity), bytes, times."""
    err = "-" if row["agg_error"] is None else f"{row['agg_error']:.2e}"
    eps = "" if row.get("epsilon") is None else f"  ε {row['epsilon']:.2f}"
    ppl = f"  ppl {row['perplexity']:.2f}" if row.get("perplexity") is not None else ""
    ppl += f"  personal {row['personal_accuracy']:.4f}" if row.get("personal_accuracy") is not None else ""
    name = METRIC_LABELS.get(row.get("metric", "accuracy"), row.get("metric", "acc"))
    return (f"round {row['round']:>3}  {name} {row['accuracy']:.4f}  loss {row['loss']:.4f}{ppl}  "
            f"agg_err {err}  up {row['bytes_up'] / 1e6:.2f} MB  down {row['bytes_down'] / 1e6:.2f} MB  "
            f"{row['seconds']:.1f}s (eval {row.get('eval_seconds', 0.0):.1f}s){eps}")
