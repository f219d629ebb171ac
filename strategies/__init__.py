"""LoRA-aware aggregation strategies: pure functions over adapter factors (torch only)."""

from .base import Aggregate, ClientUpload, GlobalState, Strategy, factored_sq_norm
from .dp import ClientLevelDP
from .registry import STRATEGIES, get_strategy

__all__ = [
    "Aggregate",
    "ClientLevelDP",
    "ClientUpload",
    "GlobalState",
    "STRATEGIES",
    "Strategy",
    "factored_sq_norm",
    "get_strategy",
]
