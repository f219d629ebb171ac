"""The global state of a federated job, the same in every engine.

A :class:`Coordinator` owns the global state and everything about it that must be identical
in ``fedlora-sim`` and ``fedlora-server``: the initial state, the order in which the seed
generator is used (FLoRA's fresh adapters), what each client is sent (its payload: the state and
the folds it misses, by client id), aggregation, the rows so far and checkpoints. The round loop
(:mod:`fedlora.rounds.loop`) drives it; its model ``fm`` is the one the global state is loaded into
and evaluated with (the simulator's batched model, or the ServerApp's one-slot model).

Round t (t ≥ 1): clients load :meth:`download` (the global state after round t-1,
plus FLoRA's fold of round t-1 and ``fresh_seed``), train, upload; :meth:`aggregate`
makes the state of round t. Round 0 is the initial state; for Fed-SB it is built
by initialisation phases over the clients' data (:meth:`start` with a ``gather``).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fedlora.errors import UserError
from fedlora.job.defaults import DP_RECIPE, measures_clip
from fedlora.job.paths import data_digests, recorded
from fedlora.job.schema import JobConfig
from fedlora.models.lora import linear_shape
from fedlora.models.model import FederatedModel, draw_seed
from fedlora.models.state import apply_global, download_tensors, head_of, held_residual, initial_state
from fedlora.privacy.public import measure_clip, public_uploads, train_head, warm_start
from fedlora.rounds.checkpoint import CHECKPOINT as CHECKPOINT  # re-exported (server/app.py)
from fedlora.rounds.checkpoint import load_checkpoint, save_checkpoint
from fedlora.rounds.compress import parse_scheme, round_trip, upload_codec
from fedlora.rounds.validate import RejectedReply
from fedlora.strategies import (
    Aggregate,
    ClientUpload,
    GlobalState,
    Strategy,
)
from fedlora.strategies.base import Factors, Probe
from fedlora.strategies.flora import merge
from fedlora.strategies.plan import AdapterPlan
from fedlora.tasks import get_task

log = logging.getLogger(__name__)

Gather = Callable[[int, dict[str, Probe]], list[ClientUpload]]


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
        self.digests: dict[str, str] | None = None   # the data files' digests, at the first checkpoint
        self.fresh_seed: int | None = None           # FLoRA: adapters of the next round
        self.rows: list[dict] = []
        self.synced: dict[object, int] = {}          # client -> last round whose fold it applied
        self.has_shared: set[object] = set()         # clients holding the plan's shared/kept factors
        self.personal: dict[object, dict[str, Tensor]] = {}  # simulated clients' kept factors
        self.metrics: dict = {}                      # the last aggregate's own columns
        self.clip: float | None = None               # --dp sample: the clip measured on --init-data
        self.codec = upload_codec(cfg, strategy)                 # --compress: the uploads' coding
        self.down = parse_scheme(cfg.compress_down)  # downloads: the state is kept at this precision
        self.residual: dict[object, dict[str, Tensor]] = {}  # simulated clients' error feedback
        self.ledgers: dict[object, int] = {}          # simulated clients' DP-SGD steps taken
        self.client_data: dict[str, int] = {}         # deployed clients' own --data digests
        #: --dp client, fewer clients a round than clients: the rounds' clients drawn from a secret
        #: (fresh each run and resume), not from --seed (default 0, and in config.json): the accountant
        #: credits amplification by sampling, which a draw anyone can repeat does not give
        #: (--dp-reproducible: from --seed, for tests)
        self.draw_secret = (secrets.randbits(128) if cfg.dp == "client" and not cfg.dp_reproducible
                            and cfg.per_round() < cfg.num_clients else None)
        self._reference: tuple[tuple[int, int], dict[str, Tensor]] | None = None  # reference() of a state

    def sampled(self, rnd: int) -> list[int]:
        """Round ``rnd``'s clients: the job's draw (:meth:`JobConfig.sampled`), the same in every
        engine, or under ``--dp client`` the secret one (:attr:`draw_secret`)."""
        return self.cfg.sampled(rnd, self.draw_secret)

    # ---- state ----
    def start(self, gather: Gather | None = None) -> None:
        """Round 0: the initial global state, after the strategy's initialisation phases.

        Phase p sends the strategy's probes to the clients, ``gather(p, probes)`` returns their
        uploads, the strategy reduces them; with ``--init-data`` the phases run here on the
        public file instead (no upload, no privacy cost).
        """
        shapes = {name: linear_shape(layer) for name, layer in self.fm.adapters.items()}
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
        """What the server does with the public ``--init-data`` file (:mod:`fedlora.privacy.public`), in
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
        self._shipped(fold)
        self.fm.set_plan(self.plan)
        fresh = self.state.factors is None and self.plan.start == "fresh"
        self.fresh_seed = draw_seed(self.gen) if fresh else None
        apply_global(self.fm, self.state, fold, self.fresh_seed)
        self._note_residual()

    def _shipped(self, fold: dict[str, Factors]) -> dict[str, Factors]:
        """``--compress-down``: hold the state (and return ``fold``) at the precision clients receive
        it, so that every engine's clients and the server's evaluation see the same values (the
        schemes are idempotent: the download re-encodes them exactly). A coded ``fold`` is returned as
        a new dict, which :meth:`_advance` then adds to ``state.merged`` in place of the exact one."""
        if not self.down.lossy:
            return fold
        st = self.state

        def at(t: Tensor | None) -> Tensor | None:
            return None if t is None else round_trip(self.down, t.detach().cpu()).to(t.device, t.dtype)

        if st.factors is not None:
            st.factors = {k: (at(A), at(B)) for k, (A, B) in st.factors.items()}
        if st.cores is not None:
            st.cores = {k: at(R) for k, R in st.cores.items()}
        st.head = {k: at(t) for k, t in st.head.items()}
        return {k: (at(A), at(B)) for k, (A, B) in fold.items()}

    def reference(self) -> dict[str, Tensor]:
        """What a client of the next round starts its uploaded tensors from, as both sides hold it
        (the state's tensors by name): the reference of ``--compress``'s upload coding."""
        assert self.state is not None
        key = (id(self.state), self.round)  # a new state each round: built once per round, not per reply
        if self._reference is None or self._reference[0] != key:
            self._reference = (key, download_tensors(self.state, {}, self.plan, first=True))
        return self._reference[1]

    def decode_upload(self, message: dict[str, Tensor],
                      expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
        """A client's upload tensors from its ``--compress`` message (``ValueError`` if malformed)."""
        return self.codec.decode(message, self.reference(), expected)

    def _note_residual(self) -> None:
        """``--fold-rank``: the state records what the model holds of its folds (a truncation),
        which is what the model is evaluated with and exported as."""
        if self.cfg.fold_rank and self.state is not None:
            merged = self.state.merged  # where the strategy keeps it (the residual is on the model's device)
            self.state.residual = {name: tuple(t.to(merged[name][0].device) for t in pair)
                                   for name, pair in held_residual(self.fm).items() if name in merged}

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
        old, self.state = self.state, agg.state
        exact, agg.fold = agg.fold, self._shipped(agg.fold)
        if agg.fold is not exact and agg.fold:  # the model (and every client) folds the coded fold:
            merged = dict(old.merged)  # so must the state that is exported, checkpointed, resumed
            for layer, (A, B) in agg.fold.items():
                merge(merged, layer, A, B)
            self.state.merged = merged
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

    def check_client_data(self, client: int, digest: int | None) -> None:
        """Refuse (:class:`RejectedReply`) a deployed client's reply from other data than it first
        trained on in this run (``digest``: of its own ``--data``; None: it trains on the job's, which
        ``--resume`` checks). The first is kept, and checkpointed: a client restarted on an edited or
        other file would change its share of the job unseen."""
        if digest is not None and self.client_data.setdefault(str(client), int(digest)) != int(digest):
            raise RejectedReply(f"client {client}'s --data is not the file it trained on earlier in this"
                                " run (restarted on edited or other data): restart it on that data, or"
                                " start a new run")

    def catch_up(self, folded_through: int) -> dict[str, Tensor]:
        """Folds a client that has applied rounds ≤ ``folded_through`` still misses,
        except the last one (which is in :meth:`download`): ``t<round>.<layer>.fold_A/B``."""
        out: dict[str, Tensor] = {}
        for t in range(folded_through + 1, self.round):
            for layer, (A, B) in self.folds[t - 1].items():
                out[f"t{t}.{layer}.fold_A"], out[f"t{t}.{layer}.fold_B"] = A, B
        return out

    # ---- metrics ----
    # ---- checkpoints ----
    def save(self, out_dir: Path) -> Path:
        """Write ``checkpoint.safetensors`` atomically (:mod:`fedlora.rounds.checkpoint`: no pickle)."""
        if self.digests is None:  # the data files as this run read them: --resume checks them
            self.digests = data_digests(self.cfg)
        blob = {"config": recorded(self.cfg), "data": self.digests, "round": self.round,
                "state": self.state, "folds": self.folds, "gen": self.gen.get_state(),
                "fresh_seed": self.fresh_seed, "rows": self.rows, "personal": self.personal,
                "clip": self.clip, "residual": self.residual, "ledgers": self.ledgers,
                "client_data": self.client_data}
        return save_checkpoint(out_dir, blob)

    def restore(self, path: Path) -> None:
        """Continue after the round saved in ``path`` (a checkpoint, its folder, or an older fedlora's
        ``checkpoint.pt``, read without unpickling code): base folds, state and seeds."""
        blob = load_checkpoint(path)
        self.round, self.state, self.folds = blob["round"], blob["state"], blob["folds"]
        self.rows, self._reference = blob["rows"], None
        self.gen.set_state(blob["gen"])
        for fold in self.folds:
            for name, (A, B) in fold.items():
                self.fm.adapters[name].fold(A, B)
        self.fresh_seed = blob["fresh_seed"]
        self.personal = blob.get("personal", {})
        self.residual = blob.get("residual", {})
        self.ledgers = blob.get("ledgers", {})
        self.client_data = blob.get("client_data", {})
        self.clip = blob.get("clip")
        if self.clip is None and measures_clip(self.cfg):
            # written before the clip was measured: its clients clipped at the recipe's clip; keep it
            self.clip = DP_RECIPE["max_grad_norm"]
            log.warning("%s has no measured clip (written by an older fedlora): its clients clipped at"
                        " %g and the resumed rounds do too", path, self.clip)
        self.strategy.resume(self.round)  # --dp client: releases so far
        self.fm.set_plan(self.plan)
        apply_global(self.fm, self.state, {}, self.fresh_seed)
        self._note_residual()


