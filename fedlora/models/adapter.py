"""Read an exported PEFT LoRA adapter back, check it against a base model, load it into a
:class:`~fedlora.models.model.FederatedModel` (``fedlora-eval``), or fold it into the frozen base a job
starts from (``--init-adapter``: :func:`fold_into_base`).

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with
``base_model.model.<layer>.lora_A.weight`` (``r × d_in``) and ``…lora_B.weight`` (``d_out × r``)
per layer, and any task head under ``base_model.model.<module>.weight`` / ``.bias``, with any other
module saved whole (PEFT's ``modules_to_save``: a pooler the base's checkpoint lacked), which
:func:`load_whole` puts into the base (:mod:`fedlora.models.export` writes this; so does PEFT).
A layer's update is ``s · B A`` with PEFT's scale ``s = α / r`` (``α / √r`` with ``use_rslora``),
α and r taken from ``alpha_pattern`` / ``rank_pattern`` where they name the layer. fedlora's exports have
``s = 1``, so their factors load bit for bit.

The model is built with one slot of the adapter's largest rank and ``α`` equal to it (slot
scale 1); each layer's factors go in as ``(A, s·B)``, zero-padded to that rank (the padding adds
exact zeros).
"""

from __future__ import annotations

import filecmp
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from fedlora.errors import UserError
from fedlora.models.correction import read_marker
from fedlora.models.export import PREFIX
from fedlora.models.lora import is_quantized, linear_shape
from fedlora.models.model import HEAD_NAMES, LINEAR_TYPES, layer_dims
from fedlora.strategies import GlobalState

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass
class PeftAdapter:
    """An adapter read by :func:`read_adapter`.

    Attributes
    ----------
    path : Path
        Its folder.
    base_model : str
        The recorded ``base_model_name_or_path``.
    factors : dict
        Layer -> ``(A (r, d_in), B (d_out, r))`` with ``B A`` the layer's whole update (scale
        folded into B).
    head : dict
        Task-head tensors, ``<module>.weight`` / ``<module>.bias``, and those of the other modules
        saved whole (:func:`load_whole`).
    correction : dict or None
        The quantization correction its factors hold (``--quant-correction``'s export:
        :mod:`fedlora.models.correction`), or None.
    """

    path: Path
    base_model: str
    factors: dict[str, tuple[Tensor, Tensor]]
    head: dict[str, Tensor]
    correction: dict | None = None

    @property
    def rank(self) -> int:
        return max(A.shape[0] for A, _ in self.factors.values())


def _pattern(patterns: dict, layer: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the value of the first key that names
    ``layer`` (the whole name, or its end after a dot)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", layer):
            return value
    return default


def _config(path: Path) -> dict:
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise UserError(f"adapter {str(path)!r} has no {name}: pass a folder written by fedlora-sim,"
                            " fedlora-server or PEFT's save_pretrained (runs/NAME/adapter)")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"adapter {str(path)!r}: its {CONFIG} is not JSON ({exc}): export the adapter"
                        " again, or restore the file") from None
    if not isinstance(config, dict):
        raise UserError(f"adapter {str(path)!r}: its {CONFIG} is not a JSON object: export the adapter again")
    # fan_in_fan_out (GPT-2's Conv1D layers) changes only how PEFT merges: its factors act as on a Linear
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise UserError(f"adapter {str(path)!r} is not a plain LoRA adapter (peft_type"
                        f" {config.get('peft_type')!r}, or DoRA): fedlora-eval reads LoRA on linear layers")
    return config


def read_adapter(path: str | Path) -> PeftAdapter:
    """The adapter in folder ``path``, its scales folded into B.

    Raises
    ------
    UserError
        No such folder or files, not a LoRA adapter, or a layer without both factors.
    """
    path = Path(path)
    config = _config(path)
    tensors = load_file(str(path / WEIGHTS))
    factors, head = {}, {}
    for key, A in tensors.items():
        name = key.removeprefix(PREFIX)
        if name.endswith(_A):
            layer = name[:-len(_A)]
            B = tensors.get(f"{PREFIX}{layer}{_B}")
            if B is None:
                raise UserError(f"adapter {str(path)!r} has {key} but no lora_B for that layer")
            r = A.shape[0]
            alpha = _pattern(config.get("alpha_pattern"), layer, config.get("lora_alpha", r))
            scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            factors[layer] = (A.float(), B.float() * scale)
        elif not name.endswith(_B):  # a head (modules_to_save), under PEFT's or fedlora's key
            head[name.replace(".modules_to_save.default", "").replace(".modules_to_save", "")] = A.float()
    if not factors:
        raise UserError(f"adapter {str(path)!r} has no LoRA factors")
    base = str(config.get("base_model_name_or_path") or "")
    return PeftAdapter(path, base, factors, head, read_marker(path))


def check_correction(adapter: PeftAdapter, quantize: str, correcting: bool = False) -> None:
    """Refuse, in one line, an adapter whose factors hold the correction of a quantized base
    (its :data:`~fedlora.models.correction.MARKER` file) on another base than ``--quantize``, or beside a
    job that adds its own (``correcting``)."""
    held = adapter.correction
    if not held:
        return
    where = f"adapter {str(adapter.path)!r} holds the --quant-correction {held.get('rank')} of a" \
            f" --quantize {held.get('quantize')} base"
    if quantize != held.get("quantize"):
        raise UserError(f"{where}, which is wrong for --quantize {quantize}: pass --quantize"
                        f" {held.get('quantize')}, or an adapter exported without --quant-correction")
    if correcting:
        raise UserError(f"{where} already: drop --quant-correction")


def same_base(recorded: str, resolved: Path) -> bool:
    """Whether an adapter's recorded base model is the folder ``resolved``: the same folder, one of
    the same name (a run's relative path, a copy on another machine, the GGUF cache's folder keyed by
    the file's hash), or, where the recorded folder is on this disk, a copy of it under another name
    (the same files, byte for byte)."""
    rec = Path(recorded).expanduser()
    if not recorded:
        return False
    if rec.name == resolved.name or rec.resolve() == resolved.resolve():
        return True
    return rec.is_dir() and resolved.is_dir() and same_files(rec, resolved)


def same_files(a: Path, b: Path) -> bool:
    """Whether folders ``a`` and ``b`` hold the same files (names, sizes and bytes; subfolders left out)."""
    files = sorted(f.name for f in a.iterdir() if f.is_file())
    if files != sorted(f.name for f in b.iterdir() if f.is_file()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in files)  # sizes first, then bytes


def linear_shapes(path: Path, kind: str) -> dict[str, tuple[int, int]]:
    """Module name -> ``(d_out, d_in)`` of every linear layer (``nn.Linear``, ``Conv1D``) of the model
    in ``path``, from a weightless copy on the meta device (``kind``: ``causal-lm`` or
    ``sequence-classification``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = auto.from_config(config)
    return {n: layer_dims(m) for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}


def check_adapter(adapter: PeftAdapter, model: str, path: Path, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse, in one line naming both, an adapter trained on another base than ``--model`` (at
    ``path``), or whose target modules ``--model`` lacks or shapes differently (``shapes``:
    :func:`linear_shapes`)."""
    where = f"adapter {str(adapter.path)!r} was trained on {adapter.base_model or 'an unrecorded base'!r}"
    if not same_base(adapter.base_model, path):
        raise UserError(f"{where}, and --model {model} is {str(path)!r}: pass --model with that base"
                        " model, or another adapter")
    for layer, (A, B) in adapter.factors.items():
        if shapes.get(layer) != (B.shape[0], A.shape[1]):
            got = "has no such linear layer" if layer not in shapes else f"has it as {shapes[layer]}"
            raise UserError(f"{where}, and its target module {layer} (d_out, d_in = {B.shape[0]},"
                            f" {A.shape[1]}) does not fit --model {model}, which {got}: pass the"
                            " adapter's base model")


def padded_state(adapter: PeftAdapter, rank: int) -> GlobalState:
    """The adapter as a global state at scale 1 for slots of ``rank``: each layer's factors
    zero-padded to it."""
    factors = {}
    for layer, (A, B) in adapter.factors.items():
        extra = rank - A.shape[0]
        factors[layer] = (torch.cat([A, A.new_zeros(extra, A.shape[1])]),
                          torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1))
    return GlobalState(factors=factors, scale=1.0, head=dict(adapter.head))


def other_head(adapter: PeftAdapter, fm) -> str | None:
    """The first of ``adapter``'s head tensors that ``fm``'s heads shape otherwise, described
    (``classifier.weight of shape (1, 32), not (5, 32)``: a regression's head, or one of other
    labels), or None."""
    own = {f"{name}.{key}": getattr(layer, key).shape[1:] for name, layer in fm.heads.items()
           for key in layer.slot_keys}
    other = sorted(k for k, t in adapter.head.items() if k in own and t.shape != own[k])
    return (f"{other[0]} of shape {tuple(adapter.head[other[0]].shape)}, not {tuple(own[other[0]])}"
            if other else None)


def fold_into_base(fm, adapter: PeftAdapter, model: str, path: Path, head: bool = True) -> None:
    """Fold ``adapter``'s update ``B A`` into ``fm``'s frozen base (``--init-adapter``): into the weight
    (in its dtype), or as the exact residual beside a quantized one (:meth:`BatchedLoRALinear.fold`);
    load its head into every slot (with ``head``); and keep its factors in ``fm.base_factors``, which
    the export adds to the job's own, so the exported adapter is the whole update from the base ``path``.

    Raises
    ------
    UserError
        The adapter was trained on another base, or adapts a layer this job does not (one line).
    """
    shapes = {name: linear_shape(layer) for name, layer in fm.adapters.items()}
    missing = sorted(set(adapter.factors) - set(shapes))
    if missing:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in adapter.factors})
        raise UserError(f"--init-adapter {str(adapter.path)!r} adapts {missing[0]} ({len(missing)} layers in"
                        f" all) that this job does not: pass --target-modules {' '.join(kinds)}")
    check_adapter(adapter, model, path, shapes)
    for name, (A, B) in adapter.factors.items():
        fm.adapters[name].fold(A, B, exact=True)
    for name, layer in fm.heads.items() if head else ():
        for key in layer.slot_keys:
            if f"{name}.{key}" in adapter.head:
                with torch.no_grad():
                    getattr(layer, key)[:] = adapter.head[f"{name}.{key}"].to(getattr(layer, key))
    load_whole(fm, adapter, "--init-adapter")
    fm.base_factors = dict(adapter.factors)
    fm.correction_note = adapter.correction or fm.correction_note  # its factors hold one: so will the export


@torch.no_grad()
def load_whole(fm, adapter: PeftAdapter, flag: str = "--adapter") -> None:
    """Copy ``adapter``'s modules saved whole besides the heads (``modules_to_save``: a pooler the
    base's checkpoint lacked) into ``fm``'s frozen base, and add them to ``fm.saved_modules``, so that
    an export carries them again.

    Raises
    ------
    UserError
        A tensor ``fm`` lacks or shapes otherwise, or one of a layer ``fm`` adapts or quantizes (one line).
    """
    own = dict(fm.model.state_dict(keep_vars=True))
    for key, t in adapter.head.items():
        module = key.rpartition(".")[0]
        if key.split(".")[0] in HEAD_NAMES:
            continue
        where = f"{flag} {str(adapter.path)!r} holds {key} whole (modules_to_save)"
        if module in fm.adapters:
            raise UserError(f"{where}, a layer this job adapts: leave it out of --target-modules")
        if key not in own or own[key].shape != t.shape:
            raise UserError(f"{where}, which the model lacks or shapes otherwise: pass the adapter's"
                            " base model")
        if is_quantized(fm.model.get_submodule(module)):
            raise UserError(f"{where}, a layer --quantize quantizes: drop --quantize")
        own[key].copy_(t.to(own[key]))
        if module not in fm.saved_modules:
            fm.saved_modules.append(module)
