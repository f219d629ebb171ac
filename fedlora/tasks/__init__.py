"""Tasks: one object per ``--task`` (data, tokenization, loss, metrics, export type).

Importing this package registers the built-in tasks, the evaluations of a task that answers
prompts (``--eval``: ``generate``, ``mc``, ``mc-letters``, ``mc-partial``) and the answer
metrics (``--metric``);
``get_task(name)`` returns a task.
"""

from .answers import ANSWER_METRICS, AUTO, AnswerMetric, register_answer_metric
from .base import (
    EVALUATIONS,
    INIT,
    TASKS,
    TEST,
    TRAIN,
    Evaluation,
    Task,
    TokenLossTask,
    gather_rows,
    get_task,
    length_groups,
    register_evaluation,
    register_task,
    row_groups,
    token_losses,
)
from .choice import ChoiceSet, MultipleChoice
from .classic import CausalLM, Classification
from .dpo import DPO
from .partial import PartialChoice
from .regression import Regression
from .sft import SFT, GenerationSet, normalize

__all__ = ["ANSWER_METRICS", "AUTO", "DPO", "EVALUATIONS", "INIT", "SFT", "TASKS", "TEST", "TRAIN",
           "AnswerMetric", "CausalLM", "ChoiceSet", "Classification", "Evaluation", "GenerationSet",
           "MultipleChoice", "PartialChoice", "Regression", "Task", "TokenLossTask", "gather_rows",
           "get_task", "length_groups", "normalize", "register_answer_metric", "register_evaluation",
           "register_task", "row_groups", "token_losses"]
