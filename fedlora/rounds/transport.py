"""What differs between engines: how a round's messages reach the clients and come back.

The round itself (:func:`fedlora.rounds.loop.run`) is written once; a :class:`Transport` moves
the coordinator's payloads to the sampled clients and their replies back:

* ``fedlora.simulations.batched.BatchedTransport``: every client in this process, a round's
  clients trained together in batched passes over one base model;
* ``fedlora.server.flower_transport.FlowerTransport``: Flower messages over a ``Grid`` (a
  deployment, Flower's simulation engine, or an in-process grid in tests), SecAgg+ included.

Clients are named by their **client id** (the partition a client trains on) in every engine; a
transport that addresses something else (Flower's node ids) maps them itself. A new transport is
one file implementing this protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedlora.privacy.accounting import Budget
from fedlora.strategies import ClientUpload
from fedlora.strategies.base import Probe


@dataclass
class Replies:
    """The valid replies of one exchange (a training round or an initialisation phase).

    ``clients`` are the sorted ids of the clients that replied validly, and every list but
    ``bytes_down`` is in their order; ``bytes_down`` counts what was sent to each client the
    exchange went to, by client id (those that then failed included). ``privacy`` is each client's
    ``(ε spent, σ)`` under ``--dp sample`` (empty otherwise). ``mean`` replaces ``uploads`` when the
    transport learns only the clients' weighted mean (``--secagg``). ``failed``: clients that were
    sent the round and did not reply (the coordinator forgets what they hold). ``report``: the
    transport's own columns of the round's row (rejected replies, client seconds, SecAgg+'s error
    bound, ...).
    """

    clients: list[int]
    uploads: list[ClientUpload]
    bytes_up: list[int]
    bytes_down: list[int]
    losses: list[float] = field(default_factory=list)
    privacy: list[tuple[float, float]] = field(default_factory=list)
    mean: ClientUpload | None = None
    failed: list[int] = field(default_factory=list)
    report: dict = field(default_factory=dict)


class Transport(Protocol):
    """The engine-specific half of a round (see the module docstring).

    Attributes
    ----------
    lone : bool
        Whether each client trains alone in its own process (``--dp-backend auto`` then means
        Opacus), rather than in batched passes.
    stateless : bool
        Whether clients keep nothing between rounds (Flower's simulation engine): the coordinator
        then re-sends folds and shared factors every round.
    budgets : sequence of Budget or None
        ``--dp sample``: every client's privacy ledger, by client id, where the transport holds
        them (the simulator); None where each client keeps its own (a deployed client refuses to
        train past its budget, and reports what it spent).
    """

    lone: bool
    stateless: bool
    budgets: Sequence[Budget] | None


    def available(self, rnd: int, clients: list[int]) -> list[int]:
        """Which of ``clients`` (sorted client ids) can be sent round ``rnd`` now."""
        ...

    def query(self, phase: int, probes: dict[str, Probe], clients: list[int]) -> Replies:
        """Initialisation phase ``phase`` (Fed-SB): each client's reply to ``probes``."""
        ...

    def train(self, rnd: int, clients: list[int]) -> Replies:
        """Send round ``rnd`` (the coordinator's payload of each client) and collect the uploads."""
        ...

    def evaluate(self, clients: list[int]) -> list[dict]:
        """Each client's own model (the new global state plus what it keeps) on its held-out
        examples: ``{"accuracy", "eval_examples"}`` per client that answered, by client id."""
        ...
