"""Dishonest clients in the simulator (``--attack``, ``--attackers N``): what a defence is tried on.

Clients ``0 … N−1`` follow the protocol but lie. With ``θ̄`` the global tensors of the factors
the round's plan uploads (and the head) and ``θ_k`` what client k trained, an attacker sends

* ``scale:F``  ``θ̄ + F (θ_k − θ̄)``: its update blown up ``F`` times (model poisoning);
* ``flip``     ``θ̄ − (θ_k − θ̄)``: its update with the sign flipped;
* ``claim:N``  its honest tensors, claiming ``N`` examples (weight inflation).

Attacks need a plan whose clients start from the global factors (every sum-only strategy);
``benchmarks/robust.py`` measures what each does to accuracy with and without the server's
defences (``strategies/robust.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedlora.errors import UserError
from fedlora.strategies import ClientUpload, GlobalState
from fedlora.strategies.dp import from_update, global_tensors, update_scale, updates
from fedlora.strategies.plan import AdapterPlan


@dataclass(frozen=True)
class Attack:
    """A parsed ``--attack``: ``kind`` in scale, flip, claim and its number."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Attack:
        kind, _, value = text.partition(":")
        try:
            if kind == "flip" and not value:
                return cls("flip", -1.0)
            number = float(value)  # a claim below 1 or not finite was a traceback once the round was in
            if kind in ("scale", "claim") and math.isfinite(number) and (kind == "scale" or number >= 1):
                return cls(kind, number)
        except ValueError:
            pass
        raise UserError(f"--attack {text!r}: use scale:F (e.g. scale:100), flip or claim:N (e.g. claim:1e9),"
                        " F and N finite numbers, N ≥ 1")

    def apply(self, upload: ClientUpload, state: GlobalState, plan: AdapterPlan) -> ClientUpload:
        """What an attacker sends instead of ``upload``."""
        if self.kind == "claim":
            return replace(upload, num_examples=int(self.value))
        start = global_tensors(state, plan)
        delta = {key: self.value * t for key, t in updates([upload], start, plan)[0].items()}
        scale = update_scale(state, plan, upload)
        return from_update(delta, start, state, plan, scale, upload.num_examples)


def attack_uploads(uploads: list[ClientUpload], clients: list[int], attack: Attack | None, attackers: int,
                   state: GlobalState, plan: AdapterPlan) -> list[ClientUpload]:
    """The round's uploads with those of clients ``0 … attackers−1`` replaced by the attack's."""
    if attack is None or attackers < 1:
        return uploads
    return [attack.apply(u, state, plan) if c < attackers else u
            for u, c in zip(uploads, clients, strict=True)]
