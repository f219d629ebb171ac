"""Bytes up and down per client per round, counted as the simulator counts them, without a model.

The simulator bills each message as the serialized size of the arrays Flower would ship
(:func:`fedlora.rounds.wire.tensor_bytes` of the named tensors that
:mod:`fedlora.models.state` builds: ``upload_tensors``, ``download_tensors``, ``probe_tensors``,
plus the coordinator's catch-up folds). :func:`plan_traffic` replays a job's rounds through the
same code: the job's strategy (``make_strategy``: its initialisation phases, plan of each round
and ``aggregate``), a :class:`~fedlora.rounds.coordinator.Coordinator` for what each client is
sent (its shared factors once, the folds it missed) and the same naming functions, on random
factors of the real shapes (coded as ``--compress`` / ``--compress-down`` code them: the codings'
sizes depend on shapes alone; Fed-SB's initialisation sketches are coded too, as one-shot
uploads). Only the shapes matter, and every adapted layer of one shape gets
the same result, so the strategy runs on one layer per distinct ``(d_out, d_in)`` and the others
share its tensors (no copy): an 8B model with 10 clients a round plans in about half a minute on
2 cores, most of it the strategies' own aggregation (and its error) on one layer per shape.

:func:`record_bytes` is :func:`~fedlora.rounds.wire.tensor_bytes` computed from the tensors'
names, dtypes and shapes alone (the packed record's index, the ``.npy`` headers, Flower's object
headers and 5 MiB chunks); it equals ``tensor_bytes`` exactly (tested) except that Flower sends a
repeated chunk once (content addressing), which needs 5 MiB of identical bytes in one message.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields, is_dataclass, replace
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, SType
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER
from torch import Tensor

from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.models.state import probe_tensors, upload_tensors
from fedlora.rounds.build import make_strategy
from fedlora.rounds.compress import pack
from fedlora.rounds.coordinator import Coordinator
from fedlora.rounds.wire import DATA, INDEX, record_index
from fedlora.strategies import ClientUpload, GlobalState

T = TypeVar("T")
#: Length of a Flower object id (a SHA-256 in hex).
OBJECT_ID = 64


def _object(kind: str, children: int, body: int) -> int:
    """Bytes of one serialized Flower object: its head (type, child ids, body length) and body."""
    ids = children * OBJECT_ID + max(children - 1, 0)
    head = len(kind) + 2 * len(HEAD_VALUE_DIVIDER) + ids + len(str(body))
    return head + len(HEAD_BODY_DIVIDER) + body


def _npy(dtype: np.dtype, n: int) -> int:
    """Bytes of ``np.save`` of a 1-d array of ``n`` elements of ``dtype``."""
    header = np.lib.format.header_data_from_array_1_0(np.empty(0, dtype))
    header["shape"] = (n,)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return len(buf.getvalue()) + n * dtype.itemsize


def _array(dtype: np.dtype, n: int) -> int:
    """Bytes of a Flower ``Array`` of a 1-d array: its object and its chunks' objects."""
    data = _npy(dtype, n)
    chunks = [min(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, data - i)
              for i in range(0, data, FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)]
    meta = json.dumps({"dtype": str(dtype), "shape": [n], "stype": SType.NUMPY,
                       "arraychunk_ids": list(range(len(chunks)))})
    body = sum(_object("ArrayChunk", 0, c) for c in chunks)
    return _object("Array", len(chunks), len(meta.encode())) + body


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a tensor of ``dtype`` becomes on the wire."""
    return torch.empty(0, dtype=dtype).numpy().dtype


def record_bytes(tensors: dict[str, Tensor]) -> int:
    """:func:`fedlora.rounds.wire.tensor_bytes` of ``tensors`` from their names, dtypes and shapes
    (0 if empty): the packed record of :func:`~fedlora.rounds.wire.to_record` as Flower serializes it."""
    if not tensors:
        return 0
    shapes = {}
    for name, t in tensors.items():
        dt, shape = numpy_dtype(t.dtype), tuple(t.shape)
        shapes[name] = SimpleNamespace(dtype=dt, shape=shape, nbytes=math.prod(shape) * dt.itemsize)
    index, data = record_index(shapes)
    arrays = {INDEX: _array(np.dtype(np.uint8), len(index)), DATA: _array(np.dtype(np.uint8), data)}
    refs = json.dumps({name: "0" * OBJECT_ID for name in arrays})
    return _object("ArrayRecord", len(arrays), len(refs.encode())) + sum(arrays.values())


@dataclass
class RoundBytes:
    """One round of a plan: its clients and the bytes each sends and receives (the simulator's
    ``client_ids``, ``bytes_up_per_client``, ``bytes_down_per_client``)."""

    round: int
    clients: list[int]
    up: list[int]
    down: list[int]


class Replay:
    """A job's rounds on one representative layer per shape (see the module docstring).

    Parameters
    ----------
    cfg : JobConfig
        The job (strategy, options, ranks, clients, sampling, rounds).
    layers : dict
        Every adapted layer -> ``(d_out, d_in)``, in the model's order.
    head : dict
        The task head's tensors (``<module>.weight``...) -> shape; empty for an LLM.
    """

    def __init__(self, cfg: JobConfig, layers: dict[str, tuple[int, int]], head: dict[str, tuple[int, ...]]):
        if cfg.secagg:
            raise UserError("--secagg sends masked integer vectors in four exchanges a round; fedlora-plan"
                            " plans the plain messages of the batched simulator: drop --secagg")
        self.cfg, self.layers = cfg, layers
        self.strategy = make_strategy(cfg)
        first = {}
        for name, shape in layers.items():
            first.setdefault(shape, name)
        self.rep = {name: first[shape] for name, shape in layers.items()}    # layer -> its representative
        self.shapes = {name: shape for shape, name in first.items()}         # representative -> shape
        self.head = {key: torch.zeros(shape) for key, shape in head.items()}
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.coord = Coordinator(cfg, self.strategy, fm=None, test=None)
        self.state: GlobalState | None = None                                  # on representatives only
        self.seen: dict[tuple, Any] = {}           # what rounds of these shapes counted (see round)
        self.fold_shapes: list[Hashable] = []       # fold_shapes[t - 1]: :func:`shapes` of round t's fold

    def _full(self, per_rep: dict | None) -> dict | None:
        """A dict over the representatives as a dict over every layer (shared tensors); None and
        empty stay as they are."""
        return per_rep and {name: per_rep[rep] for name, rep in self.rep.items()}

    def _publish(self, state: GlobalState) -> None:
        """The coordinator's global state: ``state`` spread over every layer."""
        self.coord.state = replace(state, factors=self._full(state.factors), cores=self._full(state.cores),
                                   merged={})

    def _rand(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen)

    def initial(self) -> RoundBytes:
        """Round 0: the strategy's initialisation phases (Fed-SB's sketches), then its first state."""
        cfg, strategy = self.cfg, self.strategy
        clients = cfg.sampled(0) if strategy.init_releases else []
        up, down, carry = dict.fromkeys(clients, 0), dict.fromkeys(clients, 0), {}
        for phase in range(strategy.init_phases):
            probes = strategy.init_probes(phase, self.shapes, cfg.rank, carry)
            grads = {rep: self._rand(*probe.shape(*self.shapes[rep])) for rep, probe in probes.items()}
            sent = record_bytes(probe_tensors(self._full(probes)))
            message = upload_tensors(ClientUpload(1, grads=self._full(grads)), self.coord.plan)
            got = record_bytes(pack(self.coord.codec.scheme, message))  # --compress: coded as sent once
            for c in clients:
                up[c], down[c] = up[c] + got, down[c] + sent
            carry = strategy.init_reduce(phase, [ClientUpload(1, grads=grads)] * max(len(clients), 1), carry)
        rank = max(cfg.client_ranks())
        state = strategy.initialize(carry, cfg.rank, cfg.lora_alpha / cfg.rank, self.shapes)
        if state is None and strategy.plan(1).start == "fresh":
            state = GlobalState(factors=None)
        elif state is None:
            state = GlobalState(factors={rep: (self._rand(rank, d_in), torch.zeros(d_out, rank))
                                         for rep, (d_out, d_in) in self.shapes.items()},
                                scale=cfg.lora_alpha / rank)
        state.head, state.round = dict(self.head), 0
        self.state = state
        self._publish(state)
        return RoundBytes(0, sorted(up), [up[c] for c in sorted(up)], [down[c] for c in sorted(down)])

    def _upload(self, client: int) -> ClientUpload:
        """Client ``client``'s upload on the representatives: random factors of its rank."""
        cfg, plan = self.cfg, self.coord.plan
        r = cfg.rank_of(client)
        if plan.core:
            return ClientUpload(1, cores={rep: self._rand(r, r) for rep in self.shapes},
                                scale=self.state.scale, head=dict(self.head))
        factors = {rep: (None if "A" in plan.keep else self._rand(r, d_in),
                         None if "B" in plan.keep else self._rand(d_out, r))
                   for rep, (d_out, d_in) in self.shapes.items()}
        return ClientUpload(1, factors=factors, scale=cfg.lora_alpha / r, head=dict(self.head))

    def round(self, rnd: int) -> RoundBytes:
        """Round ``rnd``: every sampled client's download (with the folds it missed) and upload, then
        the strategy's aggregate, as :func:`fedlora.rounds.loop.run` orders them. What a round of the
        same shapes as an earlier one counted (a download, an upload, the aggregate's next state) is
        taken from it (:attr:`seen`): a long plan's rounds are mostly alike."""
        coord, clients, plan = self.coord, self.cfg.sampled(rnd), self.coord.plan
        coded = coord.down, coord.codec.scheme  # --compress-down, --compress (none: as they are)
        state = (shapes(self.state, skip=UNSHIPPED), shapes(coord.fold))
        down = [self._seen(("down", plan, state, *self._missed(c)),
                           lambda c=c: sum(record_bytes(pack(coded[0], t)) for t in coord.payload(c)))
                for c in clients]
        ranks = tuple(self.cfg.rank_of(c) for c in clients)
        up = [self._seen(("up", plan, r), lambda c=c: record_bytes(pack(coded[1], upload_tensors(
            self._full_upload(self._upload(c)), coord.plan)))) for c, r in zip(clients, ranks, strict=True)]
        for c in clients:
            coord.delivered(c)
        # the aggregate's next state and fold, on random uploads: only their shapes are used
        new, fold = self._seen(("aggregate", plan, state, ranks), lambda: self._aggregate(clients))
        self.state = replace(new, round=rnd)
        coord.folds.append(fold)
        self.fold_shapes.append(shapes(fold))
        coord.round = rnd
        self._publish(self.state)
        return RoundBytes(rnd, list(clients), up, down)

    def _seen(self, key: tuple, count: Callable[[], T]) -> T:
        """What ``count()`` gives for ``key``, counted once."""
        if key not in self.seen:
            self.seen[key] = count()
        return self.seen[key]

    def _missed(self, client: int) -> tuple[bool, tuple]:
        """What sets ``client``'s download's size besides the round's state: whether it is sent the
        shared factors, and the rounds (their numbers are in the names) and shapes of the folds it missed."""
        coord = self.coord
        first = coord.holds_state and client not in coord.has_shared
        missed = range(coord.synced.get(client, 0) + 1, coord.round)
        return first, tuple((t, self.fold_shapes[t - 1]) for t in missed)

    def _full_upload(self, upload: ClientUpload) -> ClientUpload:
        return replace(upload, factors=self._full(upload.factors), cores=self._full(upload.cores))

    def _aggregate(self, clients: list[int]) -> tuple[GlobalState, dict]:
        """The strategy's aggregate of random uploads of ``clients``: ``(next state, fold over every
        layer)``. The sum of the folds so far (``merged``, which never travels and grew every round:
        FLoRA's cost grew with it) is left out."""
        agg = self.strategy.aggregate([self._upload(c) for c in clients], replace(self.state, merged={}))
        return agg.state, (self._full(agg.fold) if agg.fold else {})


UNSHIPPED = ("round", "merged", "residual")
"""The fields of a global state that no message carries (:func:`shapes` leaves them out)."""


def shapes(value: Any, skip: tuple[str, ...] = ()) -> Hashable:
    """``value`` with each tensor replaced by its dtype and shape (a dataclass's fields but ``skip``,
    dicts, sequences; other values as they are): what a message's size depends on."""
    if isinstance(value, Tensor):
        return str(value.dtype), tuple(value.shape)
    if is_dataclass(value):
        return tuple((f.name, shapes(getattr(value, f.name))) for f in fields(value) if f.name not in skip)
    if isinstance(value, dict):
        return tuple((k, shapes(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return tuple(shapes(v) for v in value)
    return value


def plan_traffic(cfg: JobConfig, layers: dict[str, tuple[int, int]], head: dict[str, tuple[int, ...]],
                 rounds: int | None = None) -> list[RoundBytes]:
    """Rounds ``0 .. rounds`` (default: the job's) of ``cfg`` over a model whose adapted layers have
    the shapes ``layers`` and whose head has ``head``: the simulator's bytes per client."""
    replay = Replay(cfg, layers, head)
    out = [replay.initial()]
    out += [replay.round(rnd) for rnd in range(1, (cfg.rounds if rounds is None else rounds) + 1)]
    return out

