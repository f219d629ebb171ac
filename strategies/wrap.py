"""A strategy around another one: what client-level DP and the server's robust aggregation share.

A wrapper copies the declarations of the strategy it wraps (name, plan, flags, learning rate,
options) and hands every hook to it; a subclass changes what it must (``aggregate``, the
ledger). Wrappers nest: ``Robust(ClientLevelDP(FedAvg()))``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import ClientUpload, GlobalState, Probe, Strategy
from .plan import AdapterPlan

COPIED = ("name", "adapter_plan", "uploads", "downloads", "sum_only", "heterogeneous_ranks", "folds",
          "init_phases", "public_init", "default_lr", "dp_lr", "options", "takes_seed")
"""The declarations a wrapper takes over from the strategy it wraps."""


class Wrapped(Strategy):
    """Delegates everything but :meth:`aggregate` to ``inner``.

    Parameters
    ----------
    inner : Strategy
        The wrapped strategy (itself possibly a wrapper).
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        for attr in COPIED:
            setattr(self, attr, getattr(inner, attr))

    def plan(self, rnd: int) -> AdapterPlan:
        """The wrapped strategy's plan."""
        return self.inner.plan(rnd)

    def init_probes(self, phase: int, shapes: dict[str, tuple[int, int]], rank: int,
                    carry: dict) -> dict[str, Probe]:
        """The inner strategy's probes."""
        return self.inner.init_probes(phase, shapes, rank, carry)

    def init_reduce(self, phase: int, uploads: Sequence[ClientUpload], carry: dict) -> dict:
        """The inner strategy's reduction."""
        return self.inner.init_reduce(phase, uploads, carry)

    def initialize(self, carry: dict, rank: int, scale: float,
                   shapes: dict[str, tuple[int, int]]) -> GlobalState | None:
        """The inner first state."""
        return self.inner.initialize(carry, rank, scale, shapes)

    def aggregate_mean(self, mean: ClientUpload, clients: int, state: GlobalState):
        """The inner strategy's aggregate of the clients' mean (secure aggregation)."""
        return self.inner.aggregate_mean(mean, clients, state)

    def can_step(self) -> bool:
        """The inner ledger's answer."""
        return self.inner.can_step()

    def privacy_report(self) -> dict[str, object]:
        """The inner ledger's columns."""
        return self.inner.privacy_report()

    def round_report(self) -> dict[str, object]:
        """The inner strategy's columns, then this wrapper's ledger (client-level DP's)."""
        return {**self.inner.round_report(), **self.privacy_report()}

    def resume(self, rounds: int) -> None:
        """Passed on to the inner ledger."""
        self.inner.resume(rounds)

    def describe(self) -> dict[str, object]:
        """The inner declarations."""
        return self.inner.describe()
