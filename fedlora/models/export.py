"""Export the global adapter in PEFT's LoRA format.

``adapter_config.json`` plus ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``r × d_in``) and ``…lora_B.weight``
(``d_out × r``), and the task head under ``base_model.model.<module>.weight``
(``modules_to_save``), so ``peft.PeftModel.from_pretrained(base, DIR)`` loads it.

Every strategy's global update is written exactly as one LoRA pair per layer:
the factors of :meth:`GlobalState.delta` are concatenated (FLoRA's folded updates,
LoRA-SB's ``B R``), and ``lora_alpha`` is set equal to each layer's rank so that
PEFT's scale ``α / r`` is 1 (``rank_pattern``/``alpha_pattern`` where layers differ).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedlora.errors import UserError
from fedlora.models.correction import MARKER
from fedlora.strategies import GlobalState

PREFIX = "base_model.model."
#: The file beside an adapter with a task head that names the head's rows: the run's label names,
#: in the order of their ids (a JSON list).
LABELS = "fedlora_labels.json"
#: The file beside an adapter with a task head that names the ``--task`` that trained it (a JSON
#: string): a classifier's head and a regression's are not each other's.
TASK = "fedlora_task.json"


def export_factors(state: GlobalState, layers: list[str], base: dict | None = None
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> ``(A, B)`` with ``B A`` the layer's whole update (scale 1); ``base``: factors folded
    into the base before training (``--init-adapter``), which the update then starts from."""
    out = {}
    for layer in layers:
        us, vs = state.delta(layer)
        if base and layer in base:
            us, vs = [base[layer][1], *us], [base[layer][0], *vs]
        if not us:
            raise ValueError(f"the global state has no update for layer {layer!r}")
        out[layer] = (torch.cat(vs, dim=0).float().contiguous(),
                      torch.cat(us, dim=1).float().contiguous())
    return out


def export_peft(state: GlobalState, layers: list[str], out_dir: str | Path, base_model: str,
                task_type: str, head_modules: list[str], fan_in_fan_out: bool = False,
                base: dict | None = None, fixed: dict | None = None, note: dict | None = None,
                labels: list[str] | None = None, saved: dict | None = None, task: str | None = None,
                dropout: float = 0.0) -> Path:
    """Write ``out_dir/adapter_config.json`` and ``adapter_model.safetensors``.

    Parameters
    ----------
    state : GlobalState
        The global adapter.
    layers : list of str
        Adapted module names (as in the base model).
    out_dir : path
        Target folder; written through a temporary folder and renamed into place.
    base_model : str
        Recorded as ``base_model_name_or_path``.
    task_type : str
        PEFT task type, e.g. ``"SEQ_CLS"`` or ``"CAUSAL_LM"``.
    head_modules : list of str
        Task-head module names whose full weights are saved (``modules_to_save``).
    fan_in_fan_out : bool
        The targets are transformers ``Conv1D`` layers (GPT-2), whose weight PEFT stores
        ``d_in × d_out``; the factors are the same, only PEFT's merge transposes ``B A``.
    base : dict, optional
        Layer -> ``(A, B)`` folded into the base before training (``--init-adapter``): exported
        with the state's update, so the adapter is the whole update from ``base_model``.
    fixed : dict, optional
        Layer -> ``(A, B)`` of layers the job does not adapt that the model still changes (the
        ``--quant-correction`` of its other quantized layers): exported as LoRA pairs of their own.
    note : dict, optional
        Written as :data:`~fedlora.models.correction.MARKER` beside the adapter: what its factors
        hold besides the update (a quantization correction).
    labels : list of str, optional
        The run's label names in the order of their ids, written as :data:`LABELS` beside an
        adapter with a task head (``head_modules``), so that an evaluation numbers a test file's
        labels as the run did (:func:`read_labels`); none (a regression's scores): no file.
    saved : dict, optional
        Module name -> its frozen tensors (``state_dict``), exported whole (``modules_to_save``):
        weights the base's checkpoint lacked, which a PEFT load would otherwise draw anew.
    task : str, optional
        The ``--task`` that trained it, written as :data:`TASK` beside an adapter with a task head
        (:func:`read_task`).
    dropout : float
        The ``--lora-dropout`` it trained with, recorded as PEFT's ``lora_dropout``.
    """
    out_dir = Path(out_dir)
    factors = export_factors(state, layers, base)
    for layer, (A, B) in (fixed or {}).items():
        factors[layer] = (A.float().contiguous(), B.float().contiguous())
    tensors = {}
    for layer, (A, B) in factors.items():
        tensors[f"{PREFIX}{layer}.lora_A.weight"] = A
        tensors[f"{PREFIX}{layer}.lora_B.weight"] = B
    whole = {**state.head, **{f"{m}.{k}": t for m, part in (saved or {}).items() for k, t in part.items()}}
    for key, t in whole.items():
        tensors[f"{PREFIX}{key}"] = t.detach().float().cpu().contiguous()
    whole_modules = sorted({h.split(".")[0] for h in head_modules} | set(saved or {}))
    config = peft_config({layer: A.shape[0] for layer, (A, _) in factors.items()}, task_type, base_model,
                         whole_modules, fan_in_fan_out, dropout)
    notes = {MARKER: note} if note else {}
    if labels and head_modules:
        notes[LABELS] = list(labels)
    if task and head_modules:
        notes[TASK] = task
    return write_adapter(out_dir, tensors, config, notes)


def peft_config(ranks: dict[str, int], task_type: str, base_model: str, whole: list[str],
                fan_in_fan_out: bool, dropout: float = 0.0) -> dict:
    """PEFT's ``adapter_config.json`` of LoRA pairs of ``ranks`` (layer -> rank) whose ``B`` holds the
    scale (``lora_alpha`` = rank: PEFT's scale is 1; ``rank_pattern`` where a layer's differs), with
    the modules saved ``whole`` (``modules_to_save``) and the training's ``lora_dropout``."""
    r = max(ranks.values())
    pattern = {layer: rk for layer, rk in ranks.items() if rk != r}
    return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": str(base_model), "r": r,
            "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "lora_dropout": dropout, "bias": "none",
            "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": whole or None}


def joined(*parts: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> ``(A, B)`` whose ``B A`` is the sum of the layer's pairs in ``parts`` (stacked)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for part in parts:
        for layer, (A, B) in part.items():
            if layer in out:
                A0, B0 = out[layer]
                A, B = torch.cat([A0, A.to(A0)]), torch.cat([B0, B.to(B0)], dim=1)
            out[layer] = (A, B)
    return out


def export_model(fm, state: GlobalState, out_dir: str | Path, base_model: str, task_type: str,
                 labels: list[str] | None = None, task: str | None = None) -> Path:
    """:func:`export_peft` of a ``FederatedModel``'s global ``state``: ``fm``'s adapted layers, its
    task heads, whether its targets were ``Conv1D`` layers (``fm.transposed``), what was folded into
    its base before training (``fm.base_factors``) and the correction beside its quantized layers
    (``fm.correction``: with the update on adapted layers, on its own elsewhere) and its frozen
    modules exported whole (``fm.saved_modules``); ``labels``: the run's label names, recorded
    beside a task head, and ``task``, the ``--task`` that trained it."""
    adapted = {n: f for n, f in fm.correction.items() if n in fm.adapters}
    fixed = {n: f for n, f in fm.correction.items() if n not in fm.adapters}
    return export_peft(state, list(fm.adapters), out_dir, base_model, task_type, list(fm.heads),
                       fan_in_fan_out=bool(fm.transposed), base=joined(fm.base_factors, adapted),
                       fixed=fixed, note=fm.correction_note, labels=labels, task=task,
                       saved={m: fm.model.get_submodule(m).state_dict() for m in fm.saved_modules},
                       dropout=fm.config.dropout)


def read_labels(folder: str | Path) -> list[str] | None:
    """The label names recorded beside the adapter in ``folder`` (its :data:`LABELS`), or None
    where it has none (an adapter without a head, or exported before fedlora recorded them).

    Raises
    ------
    UserError
        The file is not a JSON list of label names.
    """
    f = Path(folder) / LABELS
    if not f.is_file():
        return None
    try:
        names = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{str(f)!r} is unreadable ({exc}): re-export the adapter, or delete the file"
                        " and pass the run's training file as --data") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{str(f)!r} is not a JSON list of label names: re-export the adapter, or delete"
                        " the file and pass the run's training file as --data")
    return names


def read_task(folder: str | Path) -> str | None:
    """The ``--task`` recorded beside the adapter in ``folder`` (its :data:`TASK`), or None where it
    has none (no head, or exported before fedlora recorded it, or unreadable: the head's shape is
    checked where it is loaded)."""
    try:
        task = json.loads((Path(folder) / TASK).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return task if isinstance(task, str) else None


def write_adapter(out_dir: Path, tensors: dict, config: dict, notes: dict | None = None) -> Path:
    """Write PEFT's two files into a temporary folder beside ``out_dir`` and rename it into place,
    so a reader sees the old adapter or the new one, never half of either."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir.parent))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, value in (notes or {}).items():
        (tmp / name).write_text(json.dumps(value, indent=2) + "\n")
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, out_dir)
    return out_dir
