"""Differential-privacy accounting: noise calibration and spent ε, by Opacus' RDP accountant.

Both DP modes are Gaussian mechanisms on subsampled data, accounted with Rényi DP
(``opacus.accountants.RDPAccountant``):

* ``--dp sample`` (DP-SGD on each client): a step samples each of the client's
  ``n_k`` examples with probability ``q_k = batch_size / n_k`` (Poisson), clips every
  example's gradient to ``C`` and adds ``N(0, σ_k² C²)`` to their sum. Each client has
  its own ``q_k``, ``σ_k`` and accountant; the planned steps are
  ``rounds × local_steps`` (plus ``init_batches`` per Fed-SB initialisation phase on the
  clients' data), counted as if the client
  trained every round (sampling of clients is not used to amplify privacy).
* ``--dp client`` (server side): a round samples each client with probability
  ``q = clients_per_round / num_clients``, clips each update to ``C`` and adds
  ``N(0, σ² C²)`` to their sum; the planned steps are the rounds (plus Fed-SB's
  initialisation round).

:class:`Budget` is one accountant with its σ, sampling rate and ε budget.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedlora.errors import UserError


class GaussianNoise:
    """Standard normal draws for one DP release.

    From OS entropy (a PCG64 generator seeded with 128 secret bits) by default; keyed
    by ``key`` (e.g. seed, round, step) when ``reproducible``, which is for tests and
    parity checks only: whoever knows the key can subtract the noise.
    """

    def __init__(self, reproducible: bool, *key: int) -> None:
        seed = [int(k) & (2**63 - 1) for k in key] if reproducible else secrets.randbits(128)
        self.rng = np.random.default_rng(seed)

    def normal(self, shape) -> torch.Tensor:
        """``(shape)`` float64 standard normal draws (CPU)."""
        return torch.from_numpy(self.rng.standard_normal(tuple(shape)))


def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """σ such that ``steps`` subsampled Gaussian steps at ``sample_rate`` spend ``(ε, δ)``."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # "optimal order is the largest alpha": still a valid bound
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant="rdp",
                                              epsilon_tolerance=0.005))
    except ValueError as exc:
        raise UserError(f"ε={epsilon:g} cannot be met with δ={delta:g} over {steps} steps at sampling"
                        f" rate {sample_rate:.3g}: {exc}; raise --epsilon or lower the steps") from None


@functools.lru_cache(maxsize=1024)
def planned_sigma(epsilon: float, delta: float, sample_rate: float, steps: int, sigma: float = 0.0) -> float:
    """``sigma`` where given (> 0), else :func:`calibrate`'s, once per process for each rate (a Ray
    actor of ``--engine flower`` rebuilds many clients of the same few rates)."""
    return sigma if sigma > 0 else calibrate(epsilon, delta, sample_rate, steps)


def spent(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε spent after ``steps`` steps, as Opacus' RDP accountant computes it; 0 for no steps.

    The RDP of ``steps`` identical subsampled Gaussian steps is ``steps`` times one step's
    (``compute_rdp`` multiplies by ``steps`` itself), so one step's RDP at every order is
    computed once per ``(σ, q)`` (:func:`_step_rdp`, about 0.2 s) and every later ε is a
    product and a minimum: ``RDPAccountant.get_epsilon``'s value to the bit, for the
    per-step budget checks of many clients.
    """
    if steps <= 0:
        return 0.0
    import warnings

    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = _step_rdp(sigma, sample_rate) * steps
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _step_rdp(sigma: float, sample_rate: float) -> np.ndarray:
    """One subsampled Gaussian step's RDP at each of the accountant's orders (``DEFAULT_ALPHAS``)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1,
                                  orders=RDPAccountant.DEFAULT_ALPHAS))


@dataclass
class Budget:
    """One party's privacy ledger: fixed σ and sampling rate, steps taken, ε cap.

    Attributes
    ----------
    sigma : float
        Noise multiplier (std of the noise / clipping norm).
    sample_rate : float
        Probability that a given example (client) is in a step (round).
    delta : float
        Target δ.
    epsilon : float
        Budget: no step is taken that would bring the spent ε above it.
    steps : int
        Steps taken so far.
    """

    sigma: float
    sample_rate: float
    delta: float
    epsilon: float
    steps: int = 0
    _cache: dict[int, float] = field(default_factory=dict, repr=False)

    @classmethod
    def planned(cls, epsilon: float, delta: float, sample_rate: float, steps: int,
                sigma: float = 0.0) -> Budget:
        """A budget whose σ is calibrated to spend ``ε`` in exactly ``steps`` (or the given σ)."""
        return cls(sigma=planned_sigma(epsilon, delta, sample_rate, steps, sigma), sample_rate=sample_rate,
                   delta=delta, epsilon=epsilon)

    def epsilon_after(self, steps: int) -> float:
        if steps not in self._cache:
            self._cache[steps] = spent(self.sigma, self.sample_rate, steps, self.delta)
        return self._cache[steps]

    @property
    def spent(self) -> float:
        return self.epsilon_after(self.steps)

    def affords(self, steps: int) -> bool:
        """Whether ``steps`` steps in all stay within the budget (small slack for the calibration)."""
        return self.epsilon_after(steps) <= self.epsilon * (1 + 1e-3)

    def can_step(self) -> bool:
        """Whether one more step stays within the budget."""
        return self.affords(self.steps + 1)

    def refuse_costly_init(self, init: int, what: str) -> None:
        """Refuse, in one line, a job whose ``init`` initialisation steps (``what``, e.g. "4
        batches") alone would spend more than the budget."""
        if init and not self.affords(init):
            raise UserError(f"the initialisation ({what} of the clients' data) alone spends"
                            f" ε={self.epsilon_after(init):.3g}, more than --epsilon {self.epsilon:g}: pass a"
                            " larger --noise-multiplier (or none, to calibrate σ), a public --init-data"
                            " FILE, or --strategy-options init=seed")

    def step(self) -> None:
        self.steps += 1


def check_delta(delta: float, smallest: int, what: str) -> None:
    """Refuse a δ that is not below 1/``smallest`` (a guarantee that allows leaking one record)."""
    if delta >= 1.0 / smallest:
        raise UserError(f"--delta {delta:g} is not below 1/({what} = {smallest}) = {1 / smallest:.3g};"
                        f" pass --delta smaller than {1 / smallest:.3g}")


def sample_budgets(cfg, sizes: list[int], init_releases: int, model=None) -> ClientBudgets:
    """One DP-SGD :class:`Budget` per client of ``--dp sample`` (``sizes``: examples per client).

    Client k samples at ``q_k = min(1, batch_size / n_k)`` and plans
    ``rounds × local_steps`` steps, plus ``init_batches`` per initialisation phase on the clients'
    data (``init_releases``, the strategy's); its σ_k is ``--noise-multiplier`` or calibrated to
    ``(ε, δ)`` over those steps, when its budget is first read (:class:`ClientBudgets`).
    """
    check_delta(cfg.delta, min(sizes), "the smallest client's examples")
    if model is not None:
        why = is_per_sample_safe(model)
        if why is not None:
            raise UserError(f"--dp sample needs per-example gradients, but {why}; use a model"
                            " without batch normalisation, or --dp client")
    init = cfg.init_batches * init_releases
    budgets = ClientBudgets(cfg, sizes, cfg.rounds * cfg.local_steps + init)
    if init:  # the smallest client samples at the largest rate: the others spend less on the same σ
        budgets[int(np.argmin(sizes))].refuse_costly_init(init, f"{init} batches")
    return budgets


class ClientBudgets(Sequence[Budget]):
    """``--dp sample``'s :class:`Budget` of each client, made when it is first read: calibrating a
    client's σ to its own sampling rate takes seconds, and a run samples few of many clients (1,000
    clients of as many sizes took many minutes to set up when every σ was calibrated first).

    Parameters
    ----------
    cfg : JobConfig
        ``batch_size``, ``epsilon``, ``delta`` and ``noise_multiplier`` (0: calibrate).
    sizes : list of int
        Examples of each client.
    steps : int
        Steps each client plans (σ is calibrated to spend ε over them).
    """

    def __init__(self, cfg, sizes: Sequence[int], steps: int) -> None:
        self.cfg, self.sizes, self.steps = cfg, list(sizes), steps
        self.made: dict[int, Budget] = {}  # the budgets read so far, by client

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, client: int) -> Budget:
        client = range(len(self.sizes))[client]  # IndexError past the clients, as a list's
        if client not in self.made:
            cfg, q = self.cfg, min(1.0, self.cfg.batch_size / self.sizes[client])
            sigma = planned_sigma(cfg.epsilon, cfg.delta, q, self.steps, cfg.noise_multiplier)
            self.made[client] = Budget(sigma=sigma, sample_rate=q, delta=cfg.delta, epsilon=cfg.epsilon)
        return self.made[client]


def is_per_sample_safe(model: nn.Module) -> str | None:
    """Why per-example gradients are undefined for ``model`` (a layer mixing examples), or None."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return f"layer {name} ({type(mod).__name__}) mixes the examples of a batch"
    return None

