"""A job's model as shapes: its config (no weights read) and a weightless build on the meta device.

:func:`model_config` reads ``--model``'s config: a preset (:mod:`fedlora.plan.presets`), the bundled
``minilm`` or ``smollm2``, a local transformers folder (``config.json``), a hub id in the local Hugging
Face cache, or a ``.gguf`` file (its metadata, through transformers: nothing is dequantized).
:func:`build_shape` builds the job's model from it on the meta device, wrapped with one client slot
exactly as the job wraps it (:class:`~fedlora.models.model.FederatedModel`: the same target modules,
adapter plan and heads), and :class:`ModelShape` holds what the planner reads of it.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.models.hub import (
    DEFAULT_MODEL,
    HUB_ID,
    SMOLLM2,
    cached_snapshot,
    gguf_source,
    new_modules,
    resolve_model_path,
)
from fedlora.models.lora import linear_shape
from fedlora.models.model import HEAD_NAMES, LINEAR_TYPES, AdapterConfig, FederatedModel, layer_dims
from fedlora.plan.presets import PRESETS, preset_config
from fedlora.rounds.build import client_strategy
from fedlora.tasks import get_task

#: Adapted modules that read the same input (one saved copy per block): LLaMA/Mistral/Qwen2's
#: attention and gated-MLP inputs, BERT's attention input.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def model_config(name: str):
    """The transformers config of ``--model`` ``name`` (see the module docstring), a fresh copy.

    Raises
    ------
    UserError
        ``name`` is no preset, bundled model, folder or ``.gguf`` file: the one line lists the presets.
    """
    config = _read_config(name)
    return type(config).from_dict(config.to_dict())


@functools.lru_cache(maxsize=8)
def _read_config(name: str):
    """:func:`model_config`, read once per process (a ``.gguf`` file's metadata takes seconds)."""
    if name in PRESETS:
        return preset_config(name)
    path = Path(name).expanduser()
    try:
        gguf = gguf_source(name)
        if gguf is not None:
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if name == DEFAULT_MODEL or path.is_dir() or HUB_ID.fullmatch(name) or cached_snapshot(name):
            return AutoConfig.from_pretrained(resolve_model_path(name), local_files_only=True,
                                              trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config of {name!r}: {str(exc).strip().splitlines()[0]}") from None
    raise UserError(f"no model or planner preset called {name!r}: pass a local folder, a .gguf file,"
                    f" '{DEFAULT_MODEL}', '{SMOLLM2}' or a preset ({', '.join(PRESETS)}), or a hub id"
                    " (org/name) of a model in the local Hugging Face cache")


@dataclass(frozen=True)
class BaseTensor:
    """One frozen tensor of the base: ``numel`` elements; ``rows`` > 0 for the weight of a linear
    layer ``--quantize`` replaces (every ``nn.Linear`` but the output embeddings and the heads)."""

    name: str
    numel: int
    rows: int = 0


@dataclass
class ModelShape:
    """What the planner reads of a job's model (built on the meta device, one client slot).

    Attributes
    ----------
    config
        The transformers config.
    fm : FederatedModel
        The wrapped model; every tensor is on the meta device.
    base : list of BaseTensor
        The frozen base's parameters and buffers, each storage once (tied embeddings once).
    """

    config: object
    fm: FederatedModel
    base: list[BaseTensor]

    @property
    def layers(self) -> dict[str, tuple[int, int]]:
        """Adapted layer -> ``(d_out, d_in)``, in the model's order (the simulator's)."""
        return {name: linear_shape(m) for name, m in self.fm.adapters.items()}

    @property
    def heads(self) -> dict[str, tuple[int, ...]]:
        """The task head's tensors as they travel (``<module>.weight`` / ``.bias``) -> shape."""
        return {f"{name}.{key}": tuple(getattr(h, key).shape[1:]) for name, h in self.fm.heads.items()
                for key in h.slot_keys}

    @property
    def text_config(self):
        """The config of the language model (a multimodal config's text part, else the config)."""
        c = self.config
        return c.get_text_config() if hasattr(c, "get_text_config") else c

    def dims(self) -> dict[str, int]:
        """The block's sizes: ``hidden``, ``intermediate``, ``layers``, ``heads``, ``attention``
        (query width), ``kv`` (key/value width), ``vocab``. An attention-free model (FNet's Fourier
        mixing, Mamba's state space) has 0 heads, and 0 attention and key/value widths."""
        text = self.text_config
        heads = int(getattr(text, "num_attention_heads", None) or 0)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // max(heads, 1)) if heads else 0
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        # the MLP's width under any of its names (INTERMEDIATE); 4 × hidden where a config leaves it
        # out (GPT-2's n_inner None, BLOOM)
        wide = next((getattr(text, k) for k in INTERMEDIATE if getattr(text, k, None)), 4 * text.hidden_size)
        return {"hidden": int(text.hidden_size), "intermediate": int(wide),
                "layers": int(text.num_hidden_layers), "heads": heads, "attention": heads * head_dim,
                "kv": kv_heads * head_dim, "vocab": int(text.vocab_size)}

    def _has_module(self, names: tuple[str, ...]) -> bool:
        """Whether a base tensor belongs to a module called one of ``names`` (its last name part)."""
        return any(t.name.rsplit(".", 2)[-2] in names for t in self.base if "." in t.name)

    @functools.cached_property
    def gated_mlp(self) -> bool:
        """Whether the blocks' MLP is gated (LLaMA's ``down(act(gate(x)) * up(x))``: a ``gate_proj``),
        rather than ``down(act(up(x)))`` (BERT's and GPT-2's)."""
        return self._has_module(GATES)

    @functools.cached_property
    def rms_norm(self) -> bool:
        """Whether the blocks' norms are RMSNorms (LLaMA's kin: they compute in fp32 whatever the
        autocast), rather than ``nn.LayerNorm`` (BERT's, GPT-2's)."""
        return any("RMSNorm" in type(m).__name__ for m in self.fm.modules())

    @functools.cached_property
    def final_norm(self) -> bool:
        """Whether a norm follows the last block (pre-norm LLaMA's ``norm``, GPT-2's ``ln_f``; a
        post-norm encoder such as BERT has none)."""
        return self._has_module(FINAL_NORMS)

    def input_groups(self) -> list[int]:
        """``d_in`` of each distinct tensor the adapted layers read: layers of one block in a group
        of :data:`SHARED_INPUTS` read one tensor, the others each their own."""
        groups: dict[str, int] = {}
        for name, (_, d_in) in self.layers.items():
            parent, _, short = name.rpartition(".")
            group = next((g for g in SHARED_INPUTS if short in g), (short,))
            groups.setdefault(f"{parent}.{group[0]}", d_in)
        return list(groups.values())


#: The names of a gated MLP's gate projection (LLaMA, Mistral, Qwen2, Gemma; Phi-3's fused one).
GATES = ("gate_proj", "gate_up_proj")

#: The names of the norm after the last block (LLaMA and its kin, GPT-2, Phi, BLOOM).
FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")

#: Config attributes that name the MLP's width, in the order they are tried: LLaMA's and BERT's,
#: GPT-2's, OPT's, BART's, T5's, DistilBERT's, Falcon's.
INTERMEDIATE = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "d_ff", "hidden_dim",
                "ffn_hidden_size")


def base_tensors(model: nn.Module) -> list[BaseTensor]:
    """The parameters and buffers of an unwrapped model but its heads (which become per-client),
    each storage once; the linear layers ``--quantize`` replaces carry their rows."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = set(HEAD_NAMES)  # the heads --quantize leaves alone (quantize.UNQUANTIZED_HEADS is this list)
    out, seen = [], set()
    for module_name, module in model.named_modules():
        parts = set(module_name.split("."))
        if module_name.split(".")[0] in HEAD_NAMES:
            continue
        for key, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            quantizable = (isinstance(module, LINEAR_TYPES) and key == "weight" and module is not output
                           and not parts & skip)
            rows = layer_dims(module)[0] if quantizable else 0
            out.append(BaseTensor(f"{module_name}.{key}", t.numel(), rows))
    return out


def checkpoint_names(name: str) -> set[str] | None:
    """The weight names in ``--model``'s safetensors files (their headers: no weight is read), or None
    where there are none to read: a preset, a ``.gguf`` file (``smollm2``), ``.bin`` weights."""
    path = Path(name).expanduser()
    if name in PRESETS or name == SMOLLM2 or path.suffix.lower() == ".gguf":
        return None
    names: set[str] = set()
    for file in sorted(resolve_model_path(name).glob("*.safetensors")):
        with file.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            names |= set(json.loads(fh.read(size))) - {"__metadata__"}
    return names or None


def lacked_weights(model: nn.Module, names: set[str] | None) -> list[str]:
    """The weights of ``model`` outside its repeated blocks that checkpoint ``names`` lacks (a masked-LM
    checkpoint's pooler under a classifier), which loading draws at random and a job leaves out of its
    targets (:func:`~fedlora.models.hub.new_modules`). Names are compared without the base model's
    prefix (``bert.``); a checkpoint that names fewer than half the weights is not the model's
    naming, and none counts as lacked."""
    if not names:
        return []
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    have = {n.removeprefix(prefix) for n in names}
    params = [n for n, _ in model.named_parameters()]
    lacked = [n for n in params if n.removeprefix(prefix) not in have]
    if 2 * len(lacked) > len(params):
        return []
    return [n for n in lacked if not re.search(r"\.\d+\.", n)]


def build_shape(cfg: JobConfig, num_labels: int = 2) -> ModelShape:
    """The job's model on the meta device, wrapped with one slot for the job's strategy and targets
    (``num_labels``: the classes of a classifier's head; a regression's has one output)."""
    config = model_config(cfg.model)
    task = get_task(cfg.task)
    if task.model_kind == "causal-lm":
        auto = AutoModelForCausalLM
    else:
        auto = AutoModelForSequenceClassification
        config.num_labels = task.head_outputs(num_labels)
    with torch.device("meta"):
        try:
            model = auto.from_config(config)
        except ValueError as exc:
            raise UserError(f"--task {cfg.task} cannot use {cfg.model}: {str(exc).splitlines()[0]}") from None
    base = base_tensors(model)
    plan = client_strategy(cfg).plan(1)
    drawn = new_modules(model, lacked_weights(model, checkpoint_names(cfg.model)))
    try:
        fm = FederatedModel(model, AdapterConfig(ranks=[max(cfg.client_ranks())], alpha=cfg.lora_alpha,
                                                 target_modules=cfg.target_modules, plan=plan,
                                                 train_head=task.trains_head, new_modules=drawn))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return ModelShape(config, fm, base)
