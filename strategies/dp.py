"""Client-level differential privacy around a sum-only strategy (DP-FedAvg; torch only).

Client k starts a round from the global tensors ``θ`` and uploads ``θ_k``; its update
is ``Δ_k = θ_k − θ`` over every tensor the strategy averages:

* the factors the round's adapter plan uploads: ``A`` and ``B`` of every adapted layer
  (fedavg), ``B`` only (ffa-lora), the core ``R`` (fed-sb), …; plus the task head.

One release (a round) is the Gaussian mechanism on the sum of clipped updates::

    clip_C(Δ) = Δ · min(1, C / ‖Δ‖₂)                  (one L2 norm over all of Δ_k's tensors)
    θ_new     = θ + (Σ_k clip_C(Δ_k) + N(0, σ² C² I)) / m

with ``m`` the *expected* number of clients per round: a fixed denominator and uniform
weights, since weights ``p_k ∝ n_k`` would reveal ``n_k`` and leave a client's influence
unbounded. Adding or removing one client moves the sum by at most ``C``, so each
release has noise multiplier ``σ``; composing releases over rounds (clients sampled
at rate ``q``) is accounted by the caller (``fedlora.rounds`` with Opacus' RDP
accountant), which hands in ``accountant(steps) -> ε``.

Each initialisation phase of the clients' data (Fed-SB: the sketches ``G_k Ω`` and
``Qᵀ G_k``, or the dense ``G_k``) is one more release: the uploads are clipped jointly to
``C``, summed, noised with the same ``σ`` and divided by ``m``; the inner strategy's
:meth:`init_reduce` then runs on that noisy mean alone. A public initialisation
(``--init-data``) releases nothing.

**Noise.** Release ``i`` (``i = steps`` before it; Fed-SB's initialisation phases come first)
draws its noise from ``noise(i)``, an object with ``normal(shape) -> float64 Tensor``.
The caller supplies it (``fedlora.rounds``: OS entropy, or keyed by the seed with
``--dp-reproducible``); without one, a CPU ``torch.Generator`` seeded from
``(seed, i)`` is used, which is reproducible and therefore for tests only: whoever
knows ``seed`` can regenerate the noise. ``steps`` is plain state that a resumed job
sets from its completed rounds (``Coordinator.restore`` does), so ε stays right.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .base import Aggregate, ClientUpload, GlobalState, Strategy
from .plan import AdapterPlan
from .wrap import Wrapped

Key = tuple[str, str]
"""``(kind, name)``: ``("A" | "B" | "R", layer)`` or ``("head", tensor name)``."""

Accountant = Callable[[int], float]
"""ε spent after the given number of releases."""

SLACK = 1e-3
"""Relative slack on the ε budget (σ is calibrated by a binary search)."""


def noise_seed(seed: int, step: int) -> int:
    """The generator seed of release ``step``: a hash of ``(seed, step)`` to 32 bits.

    32 bits because a CPU ``torch.Generator`` (mt19937) keeps only the low 32 bits of
    its seed; hashing keeps ``(seed, step)`` pairs apart (and away from the job's other
    generators, which are seeded with ``seed`` itself).
    """
    digest = hashlib.blake2b(f"fedlora-client-dp:{seed}:{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def global_tensors(state: GlobalState, plan: AdapterPlan) -> dict[Key, Tensor]:
    """The global tensors of the factors clients upload (``plan.upload``), and the head."""
    out: dict[Key, Tensor] = {}
    if plan.core:
        if state.factors is None or state.cores is None:
            raise ValueError("client-level DP on LoRA-SB needs the initialisation round first")
    elif state.factors is None:
        raise ValueError("client-level DP needs a global adapter to measure updates against;"
                         " this state has none (clients start from fresh adapters)")
    for kind in plan.upload:
        if kind == "R":
            out.update({("R", layer): R for layer, R in state.cores.items()})
        else:
            out.update({(kind, layer): ab[kind == "B"] for layer, ab in state.factors.items()})
    out.update({("head", key): t for key, t in state.head.items()})
    return out


def upload_tensors(upload: ClientUpload, plan: AdapterPlan) -> dict[Key, Tensor]:
    """An upload's counterparts of :func:`global_tensors`."""
    out: dict[Key, Tensor] = {}
    for kind in plan.upload:
        if kind == "R":
            out.update({("R", layer): R for layer, R in upload.cores.items()})
        else:
            out.update({(kind, layer): ab[kind == "B"] for layer, ab in upload.factors.items()})
    out.update({("head", key): t for key, t in upload.head.items()})
    return out


def as_upload(tensors: dict[Key, Tensor], state: GlobalState, plan: AdapterPlan,
              scale: float) -> ClientUpload:
    """Inverse of :func:`upload_tensors`: one synthetic upload (``num_examples=1``), its
    factors that are not uploaded taken from ``state`` (they are the global ones)."""
    up = ClientUpload(num_examples=1, scale=scale)
    if plan.core:
        up.cores = {name: t for (kind, name), t in tensors.items() if kind == "R"}
    else:
        for layer, (A, B) in state.factors.items():
            up.factors[layer] = (tensors.get(("A", layer), A), tensors.get(("B", layer), B))
    up.head = {name: t for (kind, name), t in tensors.items() if kind == "head"}
    return up


def update_scale(state: GlobalState, plan: AdapterPlan, upload: ClientUpload) -> float:
    """The LoRA scale of an upload rebuilt from an update: the global one for LoRA-SB cores (the
    shared factors are the server's), else the client's."""
    return state.scale if plan.core else upload.scale


def from_update(delta: dict[Key, Tensor], start: dict[Key, Tensor], state: GlobalState, plan: AdapterPlan,
                scale: float, num_examples: int = 1) -> ClientUpload:
    """The upload of a client whose update from the global tensors ``start`` is ``delta``
    (:func:`as_upload` of ``start + delta``)."""
    up = as_upload({key: start[key] + t for key, t in delta.items()}, state, plan, scale)
    up.num_examples = num_examples
    return up


def updates(uploads: Sequence[ClientUpload], start: dict[Key, Tensor],
            plan: AdapterPlan) -> list[dict[Key, Tensor]]:
    """``Δ_k = θ_k − θ`` per client; raises when a client's tensors do not match the global ones."""
    out = []
    for k, upload in enumerate(uploads):
        new = upload_tensors(upload, plan)
        if new.keys() != start.keys():
            raise ValueError(f"client {k} uploaded {sorted(new)} but the global state has"
                             f" {sorted(start)}")
        for key, t in new.items():
            if t.shape != start[key].shape:
                raise ValueError(f"client {k}'s {key[0]} of {key[1]} has shape {tuple(t.shape)}, the"
                                 f" global one {tuple(start[key].shape)}: client-level DP needs every"
                                 " client to train the global adapter's rank")
        out.append({key: t - start[key] for key, t in new.items()})
    return out


def joint_norm(tensors: dict[Key, Tensor]) -> float:
    """One L2 norm over all the tensors (float64)."""
    return float(sum((t.double() ** 2).sum() for t in tensors.values()) ** 0.5)


class ClientLevelDP(Wrapped):
    """Clip each client's update, noise the sum, divide by ``m`` (see the module docstring).

    Parameters
    ----------
    inner : Strategy
        A strategy whose ``sum_only`` is True (fedavg, fed-sb, ffa-lora, rolora, fedsa-lora). Its
        name, plan and flags are copied; its :meth:`aggregate` of one upload must return that upload
        as the new state (true of weighted averages).
    clip : float
        ``C``, the bound on each client's update norm.
    noise_multiplier : float
        ``σ``: the noise std is ``σ C`` on every coordinate of the sum (0: no noise).
    expected_clients : int
        ``m``, the fixed denominator: clients sampled per round. A round with more
        replies is refused (the accounting's sampling rate would be wrong).
    seed : int
        Seed of the default, reproducible noise (with the release index, see :func:`noise_seed`).
    noise : callable, optional
        ``release index -> source`` with ``source.normal(shape)`` standard normal draws.
    accountant : callable, optional
        ``steps -> ε``; without it :meth:`privacy_report` has ``epsilon`` None.
    epsilon : float, optional
        Budget: a release that would bring ``accountant(steps + 1)`` above it is refused.

    Attributes
    ----------
    steps : int
        Releases made so far (rounds, plus Fed-SB's initialisation). Set it when resuming.
    clipped_fraction : float or None
        Fraction of the last release's clients whose update norm exceeded ``C``.
    """

    def __init__(self, inner: Strategy, clip: float, noise_multiplier: float,
                 expected_clients: int, seed: int = 0, accountant: Accountant | None = None,
                 epsilon: float | None = None, noise: Callable[[int], object] | None = None) -> None:
        if not inner.sum_only:
            raise ValueError(f"client-level DP needs a strategy whose aggregate is a sum of client"
                             f" updates (sum_only, e.g. fedavg, fed-sb); {inner.name}'s is not, so"
                             " clipping and noising a sum would not bound each client's influence")
        if not 0 < clip < math.inf or not 0 <= noise_multiplier < math.inf or expected_clients < 1:
            raise ValueError(f"client-level DP needs a finite clip > 0, noise_multiplier ≥ 0 and"
                             f" expected_clients ≥ 1, got {clip}, {noise_multiplier}, {expected_clients}")
        super().__init__(inner)
        self.heterogeneous_ranks = False
        self.clip, self.sigma, self.expected_clients = float(clip), float(noise_multiplier), expected_clients
        self.seed, self.accountant, self.epsilon = seed, accountant, epsilon
        self.noise = noise if noise is not None else self._seeded
        self.steps = 0
        self.clipped_fraction: float | None = None

    # ---- the ledger ----
    def can_step(self) -> bool:
        """Whether one more release stays within the ε budget (always, without one)."""
        if self.accountant is None or self.epsilon is None:
            return True
        return self.accountant(self.steps + 1) <= self.epsilon * (1 + SLACK)

    def _seeded(self, step: int):
        """The default noise of release ``step``: reproducible from ``seed`` (tests only)."""
        gen = torch.Generator().manual_seed(noise_seed(self.seed, step))

        class _Source:
            @staticmethod
            def normal(shape) -> Tensor:
                return torch.randn(tuple(shape), generator=gen, dtype=torch.float64)

        return _Source()

    def resume(self, rounds: int) -> None:
        """Releases so far after ``rounds`` completed rounds (plus Fed-SB's initialisation)."""
        self.steps = rounds + self.init_releases

    def privacy_report(self) -> dict[str, object]:
        """Metric columns: ε spent after the releases so far, σ, C, last clipped fraction."""
        eps = None if self.accountant is None else float(self.accountant(self.steps))
        return {"dp": "client", "epsilon": eps, "noise_multiplier": self.sigma, "clip": self.clip,
                "clipped_fraction": self.clipped_fraction}

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "dp": "client", "clip": self.clip,
                "noise_multiplier": self.sigma, "expected_clients": self.expected_clients}

    # ---- releases ----
    def release(self, deltas: Sequence[dict[Key, Tensor]]) -> dict[Key, Tensor]:
        """``(Σ_k clip_C(Δ_k) + N(0, σ²C² I)) / m``; counts one step."""
        if not deltas:
            raise ValueError("cannot aggregate an empty round: no client replied")
        total = {key: torch.zeros_like(t, dtype=torch.float64) for key, t in deltas[0].items()}
        clipped = 0
        for delta in deltas:
            if delta.keys() != total.keys():
                raise ValueError(f"clients sent different tensors: {sorted(delta)} and {sorted(total)}")
            norm = joint_norm(delta)
            clipped += norm > self.clip
            factor = min(1.0, self.clip / norm) if norm > 0 else 1.0
            for key, t in delta.items():
                total[key] += factor * t.double()
        out = self.release_sum(total, len(deltas), deltas[0])
        self.clipped_fraction = clipped / len(deltas)
        return out

    def release_sum(self, total: dict[Key, Tensor], clients: int,
                    like: dict[Key, Tensor]) -> dict[Key, Tensor]:
        """``(total + N(0, σ²C² I)) / m`` for the sum of ``clients`` clipped updates (clipped by
        the server, or by the clients themselves under secure aggregation); counts one step.
        The result has the dtypes of ``like``."""
        if clients > self.expected_clients:
            raise ValueError(f"{clients} clients replied but client-level DP was set up for"
                             f" m = {self.expected_clients} per round (its sampling rate)")
        if not self.can_step():
            raise RuntimeError(f"the privacy budget ε={self.epsilon:g} is spent after"
                               f" {self.steps} releases")
        source = self.noise(self.steps)
        std = self.sigma * self.clip
        out = {}
        for key, t in total.items():
            t = t.double()
            if std > 0:
                t = t + std * source.normal(t.shape).to(t.device, torch.float64)
            out[key] = (t / self.expected_clients).to(like[key].dtype)
        self.steps += 1
        self.clipped_fraction = None
        return out

    def init_reduce(self, phase: int, uploads: Sequence[ClientUpload], carry: dict) -> dict:
        """The inner reduction of the noisy mean ``(Σ clip_C(Y_k) + noise) / m`` of the phase's
        uploads (one release); of the uploads themselves for a public initialisation."""
        if self.public_init:
            return self.inner.init_reduce(phase, uploads, carry)
        grads = [{("G", layer): g for layer, g in u.grads.items()} for u in uploads]
        mean = self.release(grads)
        noisy = ClientUpload(num_examples=1, grads={layer: g for (_, layer), g in mean.items()})
        return self.inner.init_reduce(phase, [noisy], carry)

    def aggregate(self, uploads: Sequence[ClientUpload], state: GlobalState) -> Aggregate:
        """``θ + noisy mean update``, shaped by the inner strategy; ``agg_error`` None.

        The released updates are those of the factors the round's plan uploads (RoLoRA
        alternates them)."""
        plan = self.plan(state.round + 1)
        start = global_tensors(state, plan)
        deltas = updates(uploads, start, plan)
        if not plan.core and len({u.scale for u in uploads}) > 1:
            raise ValueError(f"{self.name} needs one LoRA scale for every client")
        mean = self.release(deltas)
        scale = update_scale(state, plan, uploads[0])
        inner = self.inner.aggregate([from_update(mean, start, state, plan, scale)], state)
        return Aggregate(state=inner.state, fold={}, agg_error=None)

    def aggregate_mean(self, mean: ClientUpload, clients: int, state: GlobalState) -> Aggregate:
        """Secure aggregation: ``mean`` is the plain mean of ``clients`` updates the clients
        clipped to ``C`` themselves; noise ``clients ×`` its update like :meth:`release` does."""
        plan = self.plan(state.round + 1)
        start = global_tensors(state, plan)
        (delta,) = updates([mean], start, plan)
        total = {key: t.double() * clients for key, t in delta.items()}
        noisy = self.release_sum(total, clients, delta)
        scale = update_scale(state, plan, mean)
        return self.inner.aggregate_mean(from_update(noisy, start, state, plan, scale), clients, state)
