"""LoRA-aware aggregation strategies: pure functions over adapter factors (torch only).

Every module here but ``base``, ``plan``, ``registry`` and ``dp`` defines one strategy and
registers it with :func:`register_strategy`; :mod:`.registry` imports them all.
"""

from .base import (
    STRATEGIES,
    Aggregate,
    ClientUpload,
    GlobalState,
    Option,
    Probe,
    Strategy,
    register_strategy,
)
from .dp import ClientLevelDP
from .factors import (
    factored_sq_norm,
)
from .plan import AdapterPlan
from .registry import get_strategy, strategy_class

__all__ = [
    "AdapterPlan",
    "Aggregate",
    "ClientLevelDP",
    "ClientUpload",
    "GlobalState",
    "Option",
    "Probe",
    "STRATEGIES",
    "Strategy",
    "factored_sq_norm",
    "get_strategy",
    "register_strategy",
    "strategy_class",
]
