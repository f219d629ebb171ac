"""The small interface every aggregation strategy implements (torch only).

Notation (see each strategy's docstring): client k of K has ``n_k`` examples and
weight ``p_k = n_k / Σ n``. For one adapted layer its adapter is ``A_k``
(``r_k × d_in``), ``B_k`` (``d_out × r_k``) and scale ``s_k = α / r_k``, so its
update is ``ΔW_k = s_k B_k A_k``; the ideal aggregate is ``ΔW* = Σ p_k ΔW_k``.

A strategy is a pure function ``aggregate(uploads, state) -> Aggregate``: no
Flower, no model, no I/O. What goes over the wire is decided by the fields it
reads and writes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from .plan import LORA, AdapterPlan

Factors = tuple[Tensor, Tensor]
"""One layer's ``(A (r, d_in), B (d_out, r))``. In an upload, a factor the plan keeps on
the client (FedSA-LoRA's B) is None: the server never sees it."""


@dataclass
class ClientUpload:
    """What one client sends after local training.

    Attributes
    ----------
    num_examples : int
        ``n_k``, the client's training examples (sets ``p_k``).
    factors : dict
        LoRA form: layer name -> ``(A_k, B_k)``, ranks may differ between clients. A frozen
        factor the client did not send is the global one (filled in by the server).
    scale : float
        LoRA form: ``s_k = α / r_k``.
    cores : dict
        LoRA-SB form: layer name -> ``R_k`` (``r × r``).
    head : dict
        Full task-head tensors (averaged by every strategy: exact, since they are dense).
    grads : dict
        Initialisation phases only (Fed-SB): layer -> the client's projected gradient
        ``Lᵀ G_k R`` (see :class:`Probe`) of its loss with respect to the frozen weight.
    client : int or None
        The sender's client id, when the round loop knows it (the defences' reports name it).
    """

    num_examples: int
    factors: dict[str, Factors] = field(default_factory=dict)
    scale: float = 1.0
    cores: dict[str, Tensor] = field(default_factory=dict)
    head: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    client: int | None = None


@dataclass
class Probe:
    """What a client computes from one adapted layer in an initialisation phase:
    ``Lᵀ G_k R`` with ``G_k = ∂L_k/∂W0`` (``d_out × d_in``), never formed densely.

    ``left`` (``d_out × w``) or ``right`` (``d_in × w``) may be None (the identity): both None
    is the dense gradient, ``right = Ω`` a range sketch ``G_k Ω``, ``left = Q`` ``Qᵀ G_k``.
    """

    left: Tensor | None = None
    right: Tensor | None = None

    def shape(self, d_out: int, d_in: int) -> tuple[int, int]:
        """The shape of the client's result for a ``d_out × d_in`` layer."""
        return (d_out if self.left is None else self.left.shape[1],
                d_in if self.right is None else self.right.shape[1])


@dataclass
class GlobalState:
    """The server's global adapter, and what clients start the next round from.

    Attributes
    ----------
    factors : dict or None
        Layer -> ``(A, B)`` every client loads at the start of a round; None means
        clients start from fresh adapters (A random, B = 0), as in FLoRA. In
        LoRA-SB mode these are the frozen shared factors.
    scale : float
        Scale applied to ``B A`` (LoRA) or ``B R A`` (LoRA-SB).
    cores : dict or None
        LoRA-SB mode: layer -> global ``R``.
    merged : dict
        Layer -> ``(A_m, B_m)`` with ``B_m A_m`` the sum of all updates folded into the
        base weights so far (scale 1). Empty unless the strategy folds (FLoRA).
    residual : dict or None
        What the model holds of ``merged`` when it is truncated (``--fold-rank`` over a quantized
        base): layer -> ``(A_r, B_r)``, ``B_r A_r ≈ B_m A_m`` (set by the caller, who folds; a
        layer not in it holds nothing). None: the model holds ``merged`` exactly.
    head : dict
        Global task-head tensors.
    round : int
        Rounds aggregated into this state (set by the caller; a strategy whose plan varies
        by round reads the plan of ``round + 1`` when aggregating).
    """

    factors: dict[str, Factors] | None = None
    scale: float = 1.0
    cores: dict[str, Tensor] | None = None
    merged: dict[str, Factors] = field(default_factory=dict)
    residual: dict[str, Factors] | None = None
    head: dict[str, Tensor] = field(default_factory=dict)
    round: int = 0

    def delta(self, layer: str) -> tuple[list[Tensor], list[Tensor]]:
        """Factor lists ``(Us, Vs)`` with ``Σ U_i V_i`` the layer's whole adapter update
        relative to the original base weights as the model holds it (merged part, or its
        truncation ``residual``, plus live adapter)."""
        us, vs = [], []
        folded = self.merged if self.residual is None else self.residual
        if layer in folded:
            A, B = folded[layer]
            us.append(B)
            vs.append(A)
        if self.factors is not None and layer in self.factors:
            A, B = self.factors[layer]
            if self.cores is not None:
                us.append(self.scale * B @ self.cores[layer])
            else:
                us.append(self.scale * B)
            vs.append(A)
        return us, vs


@dataclass
class Aggregate:
    """A strategy's result for one round.

    Attributes
    ----------
    state : GlobalState
        The new global state (``merged`` already includes ``fold``).
    fold : dict
        Layer -> ``(A, B)`` to add as ``B A`` into the base weights this round (FLoRA);
        empty for the others. This is what travels down in place of an adapter.
    agg_error : float or None
        ``‖ΔW_agg − Σ p_k ΔW_k‖_F / ‖Σ p_k ΔW_k‖_F`` summed over layers (squared norms
        added before the ratio), computed without any ``d × d`` matrix. None when not
        measured (client-level DP: comparing with the exact mean would use raw updates).
    metrics : dict
        Strategy-specific columns of the round's metric row (FlexLoRA's truncation errors).
    """

    state: GlobalState
    fold: dict[str, Factors]
    agg_error: float | None
    metrics: dict[str, object] = field(default_factory=dict)


STRATEGIES: dict[str, type[Strategy]] = {}
"""Registry: name -> strategy class (filled by :func:`register_strategy`)."""


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add ``cls`` to :data:`STRATEGIES` under ``cls.name`` (in its own file)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name to be registered")
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"two strategies are called {cls.name!r}")
    STRATEGIES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Option:
    """A strategy option: its type, default and help (``--strategy-option NAME=VALUE``)."""

    type: type
    default: object
    help: str = ""


def parse_options(text: str) -> dict[str, str]:
    """``"lam=0.05, init_lr=1e-4"`` -> ``{"lam": "0.05", "init_lr": "1e-4"}``."""
    out = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"strategy option {item!r} is not NAME=VALUE")
        name = key.strip().replace("-", "_")
        if name in out:  # the last one was taken
            raise ValueError(f"strategy option {key.strip()!r} is given twice: keep one")
        out[name] = value.strip()
    return out


class Strategy(ABC):
    """Base class: declarations, options and :meth:`aggregate` (a pure function over factors).

    A new strategy is one file: subclass this, declare ``name``, its adapter plan and
    flags, implement :meth:`aggregate`, decorate the class with :func:`register_strategy`.

    Class attributes
    ----------------
    name : str
        Registry key, e.g. ``"fedavg"``.
    adapter_plan : AdapterPlan
        What a client holds, trains and sends (every round, unless :meth:`plan` says
        otherwise).
    uploads, downloads : str
        What a client sends and receives each round, in words.
    sum_only : bool
        True when the aggregate needs only (weighted) sums of client uploads, so it
        is compatible with secure aggregation and client-level DP.
    heterogeneous_ranks : bool
        True when clients may use different ranks.
    folds : bool
        True when an aggregate can carry a ``fold`` into the base weights (FLoRA,
        FedEx-LoRA): a client that missed rounds must catch up on them; its rank is
        :meth:`fold_rank`.
    init_phases : int
        Initialisation phases before round 1 (Fed-SB: 2 for sketches, 1 for the dense
        gradient, 0 for a data-free start): each sends :meth:`init_probes` and reduces
        the answers with :meth:`init_reduce`.
    public_init : bool
        True when the initialisation phases read a public file on the server, not the
        clients' data (no upload, no privacy cost).
    default_lr : float
        The local learning rate when ``--lr`` is not given.
    dp_lr : float or None
        The same under ``--dp sample``, where measured (None: the DP recipe's).
    options : dict
        Option name -> :class:`Option`; the constructor takes them as keywords.
    takes_seed : bool
        True when the constructor takes the job's ``seed`` too.
    """

    name: str = ""
    adapter_plan: AdapterPlan = LORA
    uploads: str = ""
    downloads: str = ""
    sum_only: bool = True
    heterogeneous_ranks: bool = False
    folds: bool = False
    init_phases: int = 0
    public_init: bool = False
    default_lr: float = 2e-3
    dp_lr: float | None = None
    options: dict[str, Option] = {}
    takes_seed: bool = False

    @classmethod
    def fold_rank(cls, ranks: Sequence[int]) -> int:
        """The rank of one round's fold (per adapted layer) from clients of ``ranks``; 0 for a
        strategy that does not fold. A quantized base keeps the folds as a residual of the
        rounds' ranks summed (``fedlora-plan`` counts it)."""
        return 0

    @classmethod
    def from_job(cls, job) -> Strategy:
        """The strategy of a job (``job.strategy_options``, ``job.seed``), options checked.

        Raises
        ------
        ValueError
            For an option this strategy does not take, or a value of the wrong type.
        """
        values: dict[str, object] = {}
        for key, text in parse_options(getattr(job, "strategy_options", "") or "").items():
            if key not in cls.options:
                takes = ", ".join(sorted(cls.options)) or "no options"
                raise ValueError(f"unknown option {key!r} for strategy {cls.name} (it takes: {takes})")
            try:
                values[key] = cls.options[key].type(text)
            except ValueError:
                raise ValueError(f"strategy option {key}={text!r}: expected a"
                                 f" {cls.options[key].type.__name__}") from None
            if isinstance(values[key], float) and not math.isfinite(values[key]):  # NaN passes every bound
                raise ValueError(f"strategy option {key}={text!r}: expected a finite number")
        if cls.takes_seed:
            values["seed"] = int(getattr(job, "seed", 0))
        return cls(**values)

    def plan(self, rnd: int) -> AdapterPlan:
        """The adapter plan of round ``rnd`` (≥ 1; 0 is the initial state)."""
        return self.adapter_plan

    @property
    def fresh_adapters(self) -> bool:
        """True when clients start round 1 from fresh adapters (FLoRA every round, FlexLoRA)."""
        return self.plan(1).start == "fresh"

    @property
    def init_releases(self) -> int:
        """Initialisation phases computed on the clients' data (each costs privacy)."""
        return 0 if self.public_init else self.init_phases

    def init_probes(self, phase: int, shapes: dict[str, tuple[int, int]], rank: int,
                    carry: dict) -> dict[str, Probe]:
        """Layer -> :class:`Probe` of initialisation phase ``phase`` (``shapes``: layer ->
        ``(d_out, d_in)``; ``carry``: what the earlier phases reduced to)."""
        raise NotImplementedError(f"{self.name} has no initialisation phases")

    def init_reduce(self, phase: int, uploads: Sequence[ClientUpload], carry: dict) -> dict:
        """The new ``carry`` from phase ``phase``'s uploads (their ``grads``)."""
        raise NotImplementedError(f"{self.name} has no initialisation phases")

    def initialize(self, carry: dict, rank: int, scale: float,
                   shapes: dict[str, tuple[int, int]]) -> GlobalState | None:
        """The first global state after the initialisation phases; None: the default one
        (A drawn from the seed, B = 0)."""
        return None

    @abstractmethod
    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        """The new global state from one round's uploads (and the previous state)."""

    def aggregate_mean(self, mean: ClientUpload, clients: int, state: GlobalState) -> Aggregate:
        """The new global state when the server holds only the clients' weighted mean upload
        (secure aggregation): a sum-only strategy's average of that one upload is that upload.
        ``clients``: how many clients it averages (a DP wrapper turns the mean back into a sum)."""
        if not self.sum_only:
            raise ValueError(f"{self.name}'s aggregate is not a weighted mean of the uploads, so it"
                             " cannot run on the clients' mean alone (secure aggregation)")
        return replace(self.aggregate([mean], state), agg_error=None)

    # ---- hooks a wrapper (client-level DP) fills in; a plain strategy has no ledger ----
    def can_step(self) -> bool:
        """Whether one more release is allowed (a privacy ledger may refuse)."""
        return True

    def privacy_report(self) -> dict[str, object]:
        """Metric columns of a privacy ledger (none without one)."""
        return {}

    def round_report(self) -> dict[str, object]:
        """Every metric column a wrapper adds to a round's row: the ledger's, and the defences'."""
        return self.privacy_report()

    def resume(self, rounds: int) -> None:  # noqa: B027 (a hook: nothing to do without a ledger)
        """A job resumed after ``rounds`` completed rounds (a ledger recounts its releases)."""

    def describe(self) -> dict[str, object]:
        """The strategy's declarations as a plain dict."""
        return {
            "name": self.name,
            "plan": self.adapter_plan.describe(),
            "uploads": self.uploads,
            "downloads": self.downloads,
            "sum_only": self.sum_only,
            "heterogeneous_ranks": self.heterogeneous_ranks,
            "init_phases": self.init_phases,
            "fresh_adapters": self.fresh_adapters,
            "personal": bool(self.adapter_plan.keep),
            "default_lr": self.default_lr,
            "options": {k: o.default for k, o in self.options.items()},
        }
