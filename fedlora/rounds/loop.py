"""The federated round, written once for every engine.

:func:`run` drives a :class:`~fedlora.rounds.coordinator.Coordinator` (the global state) over a
:class:`~fedlora.rounds.transport.Transport` (how messages reach the clients) into a sink (the
output folder). Round 0 is the initial state: the strategy's initialisation phases, each a
``query`` of the sampled clients (Fed-SB's sketches), then the public start (head, warm start,
measured clip; :mod:`fedlora.privacy.public`). Round t ≥ 1 is

1. **sample**: the clients of ``(seed, t)`` (:meth:`JobConfig.sampled`), in every engine (under
   ``--dp client`` a secret draw, :meth:`Coordinator.sampled`), less those whose ``--dp sample``
   budget is spent and those the transport cannot reach;
2. **train**: the transport sends each its payload (the global state, the folds it misses) and
   collects the valid uploads;
3. **attack** (``--attack``, simulated clients only) and **aggregate**: each upload, or under
   ``--secagg`` only their weighted mean;
4. **row**: the coordinator's evaluation of the new global model (on the rounds ``--eval-every``
   names, and the last), the bytes each way, the DP columns (every client's reported ε), personal
   evaluation and the transport's own columns;
5. **commit**: the sink writes the row (and the checkpoint).

A resumed coordinator (``coord.round > 0``) continues after its last round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from fedlora.errors import say
from fedlora.rounds.attacks import Attack, attack_uploads
from fedlora.rounds.coordinator import Coordinator
from fedlora.rounds.rows import personal_columns, round_row
from fedlora.rounds.sink import RunFolder
from fedlora.rounds.transport import Replies, Transport
from fedlora.strategies import ClientUpload
from fedlora.strategies.base import Probe

Schedule = Callable[[int], list[int]]
"""``round -> its clients``, in place of the job's sampling (to replay a deployed run's
participation: ``benchmarks/load.py``)."""


class Ledger:
    """``--dp sample``'s columns from what each client reports: ``(ε spent, σ)`` by client id.

    A transport that holds the clients' budgets (the simulator) reports them exactly as a deployed
    client does in its reply's metrics, so every engine's row is built here, from the same numbers.
    """

    def __init__(self, coord: Coordinator, lone: bool) -> None:
        self.on = coord.cfg.dp == "sample"
        self.backend = coord.cfg.dp_backend_for(lone=lone)
        self.spent: dict[int, tuple[float, float]] = {}
        # a resumed run: the largest ε and σ its earlier rounds reported (clients it will not sample again)
        self.before = [(r["epsilon"], r["noise_multiplier"]) for r in coord.rows
                       if r.get("epsilon") is not None and r.get("noise_multiplier") is not None]

    def columns(self, replies: Replies | None) -> dict:
        """The DP columns of a row: the round's clients' ε, the largest ε any client has spent so
        far, and the largest σ (none before a client has reported), a resumed run's earlier rounds
        included."""
        if not self.on:
            return {}
        got = replies.privacy if replies is not None else []
        clients = replies.clients if replies is not None else []
        self.spent.update(zip(clients, got, strict=True))
        values = [*self.spent.values(), *self.before]
        return {"dp": "sample", "dp_backend": self.backend,
                "epsilon_per_client": [round(e, 4) for e, _ in got],
                "epsilon": round(max((e for e, _ in values), default=0.0), 4),
                "noise_multiplier": max((s for _, s in values), default=None)}


def run(coord: Coordinator, transport: Transport, sink: RunFolder, schedule: Schedule | None = None,
        started: float | None = None) -> list[dict]:
    """Rounds ``coord.round + 1 .. cfg.rounds`` (round 0 first on a fresh run); the rows.

    ``started``: when the run's setup began (round 0's ``train_seconds`` counts from it).
    """
    ledger = Ledger(coord, transport.lone)
    if coord.state is None:
        initial_round(coord, transport, sink, ledger, time.perf_counter() if started is None else started)
    cfg = coord.cfg
    attack = Attack.parse(cfg.attack) if cfg.attack else None
    for rnd in range(coord.round + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        clients = sample(coord, transport, rnd, schedule)
        if clients is None:
            break
        plan = coord.plan
        got = transport.train(rnd, clients)
        for c in got.failed:
            coord.forget(c)
        if not transport.stateless:
            for c in got.clients:
                coord.delivered(c)  # it now holds this round's folds / shared factors
        if got.mean is not None:
            agg = coord.aggregate_mean(got.mean, len(got.clients))
        else:
            uploads = attack_uploads(got.uploads, got.clients, attack, cfg.attackers, coord.state, plan)
            agg = coord.aggregate([replace(u, client=c) for u, c in zip(uploads, got.clients, strict=True)])
        score = cfg.scores(rnd) or budget_stops_after(coord, transport, rnd, schedule)
        row = round_row(coord, got.bytes_up, got.bytes_down, agg.agg_error, got.losses,
                        time.perf_counter() - t0, len(got.clients), score)
        row.update(client_ids=got.clients, **got.report)
        if "client_seconds" in got.report:  # the round's time beyond its slowest client's training
            row["overhead_seconds"] = round(row["train_seconds"] - got.report["client_seconds"], 3)
        row.update(ledger.columns(got))
        if cfg.personal_test_fraction and score:
            row.update(personal_columns(transport.evaluate(got.clients)))
        coord.rows.append(row)
        sink.commit(row, coord)
    return coord.rows


def sample(coord: Coordinator, transport: Transport, rnd: int, schedule: Schedule | None) -> list[int] | None:
    """Round ``rnd``'s clients: the job's draw (or ``schedule``'s), less those whose privacy budget
    is spent (None when that leaves nobody: the run stops) and those the transport cannot reach."""
    cfg = coord.cfg
    clients = (schedule or coord.sampled)(rnd)
    if transport.budgets is not None:
        clients = spendable(transport, clients)
        if not clients:
            say(f"every client of round {rnd} has spent its privacy budget"
                f" (ε={cfg.epsilon:g}); stopping after round {rnd - 1}")
            return None
    return transport.available(rnd, clients)


def spendable(transport: Transport, clients: list[int]) -> list[int]:
    """Those of ``clients`` whose ``--dp sample`` budget allows another step."""
    return [c for c in clients if transport.budgets[c].can_step()]


def budget_stops_after(coord: Coordinator, transport: Transport, rnd: int, schedule: Schedule | None) -> bool:
    """Whether the run stops after round ``rnd`` before its ``--rounds``: every client of the next
    round has spent its ``--dp sample`` budget (:func:`sample` will stop it), so ``rnd``'s row is
    scored like a last round's (:meth:`JobConfig.scores` names the ``--rounds``-th)."""
    if transport.budgets is None or rnd >= coord.cfg.rounds:
        return False
    return not spendable(transport, (schedule or coord.sampled)(rnd + 1))


def initial_round(coord: Coordinator, transport: Transport, sink: RunFolder, ledger: Ledger,
                  t0: float) -> None:
    """Round 0: the initialisation phases through ``transport.query``, the initial state, its row."""
    clients = coord.sampled(0) if coord.strategy.init_releases else []
    phases = Phases(transport, transport.available(0, clients) if clients else [])
    coord.start(phases)
    last = phases.last
    row = round_row(coord, phases.bytes(phases.up), phases.bytes(phases.down), None, None,
                    time.perf_counter() - t0, len(phases.up), coord.cfg.scores(0))
    row.update(client_ids=sorted(phases.up))
    row.update(ledger.columns(last))
    coord.rows.append(row)
    sink.commit(row, coord)


class Phases:
    """The coordinator's ``gather`` of initialisation phases: each phase a ``query`` of the same
    clients, with every client's bytes up and down summed over the phases."""

    def __init__(self, transport: Transport, clients: list[int]) -> None:
        self.transport, self.clients = transport, clients
        self.up: dict[int, int] = {}
        self.down: dict[int, int] = {}
        self.last: Replies | None = None

    def __call__(self, phase: int, probes: dict[str, Probe]) -> list[ClientUpload]:
        got = self.transport.query(phase, probes, self.clients)
        for c, up, down in zip(got.clients, got.bytes_up, got.bytes_down, strict=True):
            self.up[c] = self.up.get(c, 0) + up
            self.down[c] = self.down.get(c, 0) + down
        self.last = got
        return got.uploads

    def bytes(self, per_client: dict[int, int]) -> list[int]:
        return [per_client[c] for c in sorted(per_client)]
