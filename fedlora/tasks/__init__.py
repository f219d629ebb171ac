"""Tasks: one object per ``--task`` (data, tokenization, loss, metrics, export type).

Importing this package registers the built-in tasks; ``get_task(name)`` returns one.
"""

from .base import (
    TASKS,
    Task,
    TokenLossTask,
    gather_rows,
    get_task,
    length_groups,
    register_task,
    row_groups,
    token_losses,
)
from .classic import CausalLM, Classification
from .sft import SFT, GenerationSet, normalize

__all__ = ["SFT", "TASKS", "CausalLM", "Classification", "GenerationSet", "Task", "TokenLossTask",
           "gather_rows", "get_task", "length_groups", "normalize", "register_task", "row_groups",
           "token_losses"]
