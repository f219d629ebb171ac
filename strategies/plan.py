"""Adapter plans: what a client holds, trains, sends and keeps in one round (torch-free).

A client's adapter on one layer is made of *factors*:

* ``A`` (``r × d_in``) and ``B`` (``d_out × r``): the LoRA update ``ΔW = s B A``;
* with ``R`` (``r × r``) among the factors, the LoRA-SB form ``ΔW = s B R A``.

A strategy declares, for each round, an :class:`AdapterPlan`; the batched model (which
tensors exist and which require gradients, hence which get per-example gradients),
extract/load, the wire format, reply validation, client-level DP and the Opacus grad
samplers all read it, so a new strategy states its plan instead of editing them.

Examples (``plan.describe()`` prints these):

=============  ========  =======  =======  ========  ======  ======  =====
strategy       factors   train    upload   download  shared  keep    start
=============  ========  =======  =======  ========  ======  ======  =====
fedavg         A B       A B      A B      A B                       global
flora          A B       A B      A B                                fresh
fed-sb         A B R     R        R        R         A B             global
ffa-lora       A B       B        B        B         A               global
rolora (odd)   A B       B        B        A B                       global
fedsa-lora     A B       A B      A        A                 B       global
=============  ========  =======  =======  ========  ======  ======  =====
"""

from __future__ import annotations

from dataclasses import dataclass

FACTORS = ("A", "B", "R")
STARTS = ("global", "fresh")


@dataclass(frozen=True)
class AdapterPlan:
    """One round's adapter plan.

    Attributes
    ----------
    factors : tuple of str
        The factors that exist: ``("A", "B")`` (LoRA) or ``("A", "B", "R")`` (LoRA-SB).
    train : tuple of str
        The factors a client trains; the others are frozen (no gradient, no per-example
        gradient, not in the optimizer).
    upload : tuple of str
        What a client sends after training. A frozen factor a client does not send is
        known to the server (it is the global one), so the server completes the upload
        with it; a kept factor is never known to the server.
    download : tuple of str
        What the server sends at the start of every round (besides ``shared`` and folds).
    shared : tuple of str
        Frozen factors common to every client, sent once: a client keeps them after its
        first download (LoRA-SB's A and B, FFA-LoRA's A).
    keep : tuple of str
        Personal factors: they stay on the client between rounds and are never uploaded
        (FedSA-LoRA's B). A client starts them as the round-0 global ones.
    start : {"global", "fresh"}
        Where the non-kept factors start a round: the server's global factors, or fresh
        ones (A from a seed the server sends, B = 0) because the server folded the last
        aggregate into the base weights (FLoRA).
    """

    factors: tuple[str, ...] = ("A", "B")
    train: tuple[str, ...] = ("A", "B")
    upload: tuple[str, ...] = ("A", "B")
    download: tuple[str, ...] = ("A", "B")
    shared: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    start: str = "global"

    def __post_init__(self) -> None:
        if self.factors not in (("A", "B"), ("A", "B", "R")):
            raise ValueError(f"an adapter has factors ('A', 'B') or ('A', 'B', 'R'), got {self.factors}")
        for name in ("train", "upload", "download", "shared", "keep"):
            extra = set(getattr(self, name)) - set(self.factors)
            if extra:
                raise ValueError(f"plan {name} names factors {sorted(extra)} that do not exist")
        if not self.train:
            raise ValueError("a plan must train at least one factor")
        if set(self.train) & set(self.shared):
            raise ValueError("a shared factor is frozen: it cannot also train")
        if set(self.keep) & (set(self.upload) | set(self.download) | set(self.shared)):
            raise ValueError("a kept (personal) factor is never uploaded, downloaded or shared")
        if self.start not in STARTS:
            raise ValueError(f"plan start must be one of {STARTS}, got {self.start!r}")
        if self.start == "fresh" and (self.keep or self.shared or self.download):
            raise ValueError("fresh adapters are drawn from a seed: nothing else is downloaded or kept")

    @property
    def core(self) -> bool:
        """True for the LoRA-SB form ``s B R A``."""
        return "R" in self.factors

    @property
    def frozen(self) -> tuple[str, ...]:
        """Factors that exist but do not train."""
        return tuple(f for f in self.factors if f not in self.train)

    def describe(self) -> dict[str, object]:
        return {"factors": " ".join(self.factors), "train": " ".join(self.train),
                "upload": " ".join(self.upload), "download": " ".join(self.download),
                "shared": " ".join(self.shared), "keep": " ".join(self.keep), "start": self.start}


LORA = AdapterPlan()
"""Plain LoRA: every factor trains, travels up and down (FedAvg, LoRA-FAIR)."""
