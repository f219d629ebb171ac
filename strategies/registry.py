"""The strategy registry: every module of this package is imported once, and each strategy
registers itself where it is defined (:func:`~.base.register_strategy`), so a new strategy
is one new file."""

from __future__ import annotations

import importlib
import pkgutil

from .base import STRATEGIES, Strategy

_NOT_STRATEGIES = {"base", "plan", "registry", "dp", "wrap", "robust", "server_step"}

for _module in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
    if _module.name not in _NOT_STRATEGIES:
        importlib.import_module(f"{__package__}.{_module.name}")


def get_strategy(name: str, **options: object) -> Strategy:
    """Instantiate the strategy called ``name`` with its keyword options.

    Raises
    ------
    ValueError
        When ``name`` is not registered.
    """
    return strategy_class(name)(**options)


def strategy_class(name: str) -> type[Strategy]:
    """The registered class called ``name``; a one-line error lists the others."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}"
        ) from None
