"""The server's strategy object of a job: the registry's strategy with its options, wrapped for
``--dp client`` (calibrated to its ε budget), for the server's robust aggregation and for its
learning rate (``--server-lr``).

Clients never build this: they need only the strategy's class declarations (its plan, folds and
initialisation releases), :func:`client_strategy`.
"""

from __future__ import annotations

from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.privacy.accounting import Budget, GaussianNoise
from fedlora.strategies import ClientLevelDP, Strategy, strategy_class
from fedlora.strategies.robust import Robust
from fedlora.strategies.server_step import ServerStep


def client_strategy(cfg: JobConfig) -> Strategy:
    """What a client needs of the job's strategy: the registry's strategy with its options, for its
    declarations (the adapter plan of each round, ``folds``, ``init_releases``). No privacy budget is
    calibrated and no defence is built: those are the server's (:func:`make_strategy`)."""
    try:
        return strategy_class(cfg.strategy).from_job(cfg)
    except ValueError as exc:
        raise UserError(f"--strategy {cfg.strategy}: {exc}") from None


def make_strategy(cfg: JobConfig) -> Strategy:
    """The configured strategy with its options (``Strategy.from_job``), wrapped for
    ``--dp client``, for the server's weights and robust aggregation (:class:`Robust`, when
    any of its flags is set) and for ``--server-lr`` (:class:`ServerStep`, outermost: it moves the
    defended, noised aggregate); a bad name, option or combination is a one-line :class:`UserError`."""
    strategy = client_strategy(cfg)
    strategy = client_level_dp(cfg, strategy) if cfg.dp == "client" else strategy
    try:
        robust = Robust(strategy, cfg.weighting, cfg.max_examples, cfg.norm_bound, cfg.robust_mean,
                        cfg.trim)
        strategy = robust if robust.active else strategy
        return strategy if cfg.server_lr == 1 else ServerStep(strategy, cfg.server_lr)
    except ValueError as exc:
        raise UserError(f"--strategy {cfg.strategy}: {exc}") from None


def client_level_dp(cfg: JobConfig, inner: Strategy) -> ClientLevelDP:
    """``inner`` wrapped for ``--dp client``, with its privacy ledger.

    ``m = cfg.per_round()`` clients per round sampled at rate ``q = m / num_clients``;
    the planned releases are the rounds (plus Fed-SB's initialisation); ``σ`` is
    ``--noise-multiplier`` or calibrated to spend ``(ε, δ)`` over them; ``C`` is
    ``--update-clip``. A fixed ``σ`` that cannot afford every planned round is refused
    here, before anything is trained.

    Raises
    ------
    UserError
        Non-sum strategy, missing ε, bad δ or clip, or a ``σ`` too small for the rounds.
    """
    m = cfg.per_round()
    init = inner.init_releases
    steps = cfg.rounds + init
    budget = Budget.planned(cfg.epsilon, cfg.delta, m / cfg.num_clients, steps, cfg.noise_multiplier)
    budget.refuse_costly_init(init, f"{init} release(s)")
    if not budget.affords(steps):
        raise UserError(_too_little_noise(budget, steps, steps - cfg.rounds))
    return ClientLevelDP(inner, clip=cfg.update_clip, noise_multiplier=budget.sigma,
                         expected_clients=m, seed=cfg.seed, accountant=budget.epsilon_after,
                         epsilon=cfg.epsilon,
                         noise=lambda step: GaussianNoise(cfg.dp_reproducible, cfg.seed, step, 0xC1))


def _too_little_noise(budget: Budget, steps: int, extra: int) -> str:
    """The refusal of a fixed σ that spends ε before the last planned round."""
    lo, hi = 0, steps       # largest affordable number of releases, by bisection (ε grows)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budget.affords(mid):
            lo = mid
        else:
            hi = mid - 1
    rounds = max(lo - extra, 0)
    fix = f"pass --rounds {rounds}, " if rounds else "pass "
    return (f"--noise-multiplier {budget.sigma:g} spends the privacy budget ε={budget.epsilon:g} before"
            f" the last round (ε={budget.epsilon_after(steps):.3g} after {steps - extra} rounds); it"
            f" affords {rounds} rounds: {fix}a larger --noise-multiplier, or none to calibrate σ"
            " to --epsilon")


