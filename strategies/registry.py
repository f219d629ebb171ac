"""Name -> strategy class, and a factory."""

from __future__ import annotations

from .base import Strategy
from .fed_sb import FedSB
from .fedavg import FedAvg
from .flora import FLoRA
from .lora_fair import LoRAFAIR

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FLoRA, LoRAFAIR, FedSB)
}


def get_strategy(name: str, **options: object) -> Strategy:
    """Instantiate the strategy called ``name`` with its keyword options.

    Raises
    ------
    ValueError
        When ``name`` is not registered.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}"
        ) from None
    return cls(**options)
