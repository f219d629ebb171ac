"""Wrap any transformers model so that K clients train adapters over one shared base.

:class:`FederatedModel` swaps the targeted linear layers (``nn.Linear``, or transformers'
``Conv1D`` of GPT-2-style models, turned into the equal ``nn.Linear`` first) for
:class:`~fedlora.lora.BatchedLoRALinear` and the task head's linear layers for
:class:`~fedlora.lora.BatchedLinear`, freezes everything else, and routes each batch
row to its client slot. A client in its own process is the case K = 1.

Dropout stays off in the wrapped model (it is kept in eval mode): the base is
frozen, and identical results for K clients batched and one at a time need a
deterministic forward pass.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from fedlora.errors import UserError
from fedlora.kernels import Routing
from fedlora.models.head import BatchedLinear
from fedlora.models.lora import BatchedLoRALinear, Router, linear_shape
from fedlora.models.peft_targets import check_peft_targets
from fedlora.strategies.plan import LORA, AdapterPlan

#: Attention query/value names tried in order when no target is given.
DEFAULT_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"),          # BERT, RoBERTa, MiniLM
    ("q_proj", "v_proj"),        # LLaMA, Mistral, OPT, Qwen
    ("q_lin", "v_lin"),          # DistilBERT
    ("q", "v"),                  # T5
    ("query_proj", "value_proj"),  # DeBERTa-v2/v3
    ("c_attn",),                 # GPT-2 (fused q/k/v, a Conv1D)
    ("query_key_value",),        # BLOOM, Falcon, GPT-NeoX, Pythia (fused)
    ("qkv_proj",),               # Phi-3 (fused)
    ("Wqkv",),                   # MPT, ModernBERT (fused)
    ("in_proj",),                # DeBERTa (v1, fused)
    ("q_head", "v_head"),        # Funnel Transformer
)
#: The layer types an adapter wraps: ``nn.Linear`` (bitsandbytes' quantized layers are subclasses)
#: and transformers' ``Conv1D`` (GPT-2: ``y = x W + b`` with ``W`` stored ``d_in × d_out``); not a
#: mixture of experts' router that is an ``nn.Linear`` returning its routing (PhiMoE's, Llama 4's).
LINEAR_TYPES = (nn.Linear, Conv1D)
#: ``--target-modules`` value that adapts every linear layer of the blocks.
ALL_LINEAR = "all-linear"
#: Attribute names of sequence-classification heads; every one a model has is trained per client:
#: ``classifier`` (BERT, RoBERTa, DeBERTa, ELECTRA), ``pre_classifier`` with it (DistilBERT),
#: ``score`` (decoders: LLaMA, GPT-2, Qwen), ``classification_head`` (BART, T5), ``sequence_summary``
#: (XLM, Flaubert; with ``logits_proj``, XLNet).
HEAD_NAMES: tuple[str, ...] = ("pre_classifier", "classifier", "score", "classification_head",
                               "sequence_summary", "logits_proj")


@dataclass
class AdapterConfig:
    """Which layers get adapters and how.

    Attributes
    ----------
    ranks : list of int
        Rank of each client slot (K = len(ranks)).
    alpha : float
        LoRA α (scale α / r).
    target_modules : list of str or None
        Module-name patterns: a plain name matches a module whose dotted name equals
        it or ends with ``"." + name``; anything with regex characters must match the
        whole name. ``["all-linear"]`` picks every linear layer but the output
        (vocabulary) layer and the head. None picks the attention query/value layers.
    plan : AdapterPlan
        Which factors exist and which train (the strategy's plan of the first round;
        :meth:`FederatedModel.set_plan` switches the trained factors later).
    train_head : bool
        Train the classification head per client (sequence classification only).
    gradient_checkpointing : bool
        Recompute the base model's blocks in the backward pass (transformers' activation
        checkpointing) instead of keeping their activations.
    fold_rank : int
        Over a quantized base, the most singular directions each layer's folded residual keeps
        (``--fold-rank``); 0: all, exactly.
    new_modules : list of str
        Modules besides the heads whose weights the checkpoint lacked (drawn at random at load:
        :func:`fedlora.models.hub.new_modules`): never adapted, and exported whole.
    dropout : float
        The adapters' input dropout in training (``--lora-dropout``; 0: none).
    """

    ranks: list[int]
    alpha: float = 16.0
    target_modules: list[str] | None = None
    plan: AdapterPlan = LORA
    train_head: bool = True
    gradient_checkpointing: bool = False
    fold_rank: int = 0
    new_modules: list[str] = field(default_factory=list)
    dropout: float = 0.0
    resolved_targets: list[str] = field(default_factory=list)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a layer of :data:`LINEAR_TYPES`."""
    if isinstance(module, Conv1D):
        return int(module.nf), int(module.weight.shape[0])
    return linear_shape(module)


@torch.no_grad()
def as_linear(module: nn.Module) -> nn.Module:
    """A ``Conv1D`` as the ``nn.Linear`` that computes the same (weight ``Wᵀ``, same bias, frozen);
    any other layer as it is. Folds, residuals and exports then need no transposed case."""
    if not isinstance(module, Conv1D):
        return module
    d_out, d_in = layer_dims(module)
    w = module.weight
    linear = nn.Linear(d_in, d_out, bias=module.bias is not None, device=w.device, dtype=w.dtype)
    linear.weight.copy_(w.T)
    if module.bias is not None:
        linear.bias.copy_(module.bias)
    return linear.requires_grad_(False)


def _matches(name: str, pattern: str) -> bool:
    if re.fullmatch(r"[\w.]+", pattern):
        return name == pattern or name.endswith("." + pattern)
    return re.fullmatch(pattern, name) is not None


def _new(name: str, new: list[str]) -> bool:
    return any(name == n or name.startswith(n + ".") for n in new)


def find_targets(model: nn.Module, patterns: list[str] | None, new: list[str] = ()
                 ) -> tuple[list[str], list[str]]:
    """``(module names, patterns used)`` of the linear layers (:data:`LINEAR_TYPES`) to adapt: never a
    head's, nor one in a module of ``new`` (weights the checkpoint lacked, exported whole).

    Raises
    ------
    ValueError
        When nothing matches (the message lists some linear layer names), or explicit ``patterns``
        name a layer of ``new``.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and m is not output
               and n.split(".")[0] not in HEAD_NAMES and not type(m).__name__.endswith("Router")]
    if patterns and list(patterns) == [ALL_LINEAR]:
        names = [n for n in linears if not _new(n, new)]
        if names:
            return names, [ALL_LINEAR]
    candidates = [list(patterns)] if patterns else [list(p) for p in DEFAULT_TARGETS]
    for pats in candidates:
        names = [n for n in linears if any(_matches(n, p) for p in pats)]
        drawn = [n for n in names if _new(n, new)]
        if drawn and patterns:
            raise ValueError(f"--target-modules matches {drawn[0]}, whose weights the checkpoint lacks (drawn"
                             " at random, frozen and exported whole): leave it out of --target-modules")
        names = [n for n in names if not _new(n, new)]
        if names:
            return names, pats
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear layer to adapt (nn.Linear or transformers'"
                         " Conv1D) outside its head: fedlora cannot put LoRA on it")
    sample = ", ".join(sorted({n.split(".")[-1] for n in linears})[:12])
    asked = ", ".join(patterns) if patterns else "attention query/value"
    why = ""
    if patterns and any("," in p for p in patterns):
        why = "; give several names apart (--target-modules q_proj v_proj), not joined by a comma"
    elif output is not None and any(_matches(n, p) for p in patterns or () for n, m in model.named_modules()
                                    if m is output):
        why = "; the output embeddings (the LM head) are never adapted"
    raise ValueError(f"no linear layer matches {asked}{why}; this model's linear layer names"
                     f" include: {sample} (pass them with --target-modules)")


def check_bypassed(adapters: dict[str, BatchedLoRALinear]) -> None:
    """Refuse, after a forward pass, a layer whose weight the model read in it but which it never
    called: it computes with the base weight itself (Mamba's ``dt_proj``; fused kernels), past the
    adapter (reads before the pass, by fedlora's own code, do not count)."""
    skipped = [name for name, layer in adapters.items() if layer.weight_read and not layer.called]
    if skipped:
        raise UserError(f"the model computes with {skipped[0]}'s weight itself, not through the layer, so"
                        " an adapter there would not train: leave it out of --target-modules")


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``name`` in ``root``, in place of what is there."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class FederatedModel(nn.Module):
    """A transformers model with K client slots of adapters and task heads.

    Parameters
    ----------
    model : nn.Module
        The base model; modified in place (targets and head swapped, all frozen).
    config : AdapterConfig
        Adapter settings.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        if not config.ranks or min(config.ranks) < 1:
            raise ValueError(f"every client needs a rank ≥ 1, got {config.ranks}")
        self.model = model
        self.config = config
        self.router = Router()
        for p in model.parameters():
            p.requires_grad_(False)
        names, used = find_targets(model, config.target_modules, config.new_modules)
        check_peft_targets(model, names)
        config.resolved_targets = used
        #: Modules exported whole besides the heads (PEFT's ``modules_to_save``): those whose weights
        #: the checkpoint lacked, and those an ``--init-adapter`` set.
        self.saved_modules: list[str] = list(config.new_modules)
        self.adapters: dict[str, BatchedLoRALinear] = {}
        #: Layer -> ``(A, B)`` folded into the base before training (``--init-adapter``), exported too.
        self.base_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: Layer -> ``(A, B)`` of the frozen correction beside its quantized base (``--quant-correction``:
        #: :mod:`fedlora.models.correction`), exported too, with what it is (``correction_note``).
        self.correction: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.correction_note: dict | None = None
        #: Targets that were ``Conv1D`` layers (PEFT's ``fan_in_fan_out`` on export).
        self.transposed = [name for name in names if isinstance(model.get_submodule(name), Conv1D)]
        for i, name in enumerate(names):
            layer = BatchedLoRALinear(as_linear(model.get_submodule(name)), config.ranks, config.alpha,
                                      self.router, core=config.plan.core, fold_rank=config.fold_rank,
                                      dropout=config.dropout, layer_id=i)
            set_module(model, name, layer)
            self.adapters[name] = layer
        self.set_plan(config.plan)
        self.heads: dict[str, BatchedLinear] = {}
        if config.train_head:
            for name in self._head_linears():
                head = BatchedLinear(model.get_submodule(name), len(config.ranks), self.router)
                set_module(model, name, head)
                self.heads[name] = head
        if config.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or \
                model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        # transformers' causal LMs compute the logits of chosen positions only (``logits_to_keep``)
        self.cuts_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.checked = False  # whether a forward pass has run the adapters' check_bypassed
        self.model.eval()

    def _head_linears(self) -> list[str]:
        names = []
        for head in HEAD_NAMES:
            module = getattr(self.model, head, None)
            if isinstance(module, nn.Linear):
                names.append(head)
            elif isinstance(module, nn.Module):
                names += [f"{head}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        return names

    @property
    def num_clients(self) -> int:
        return len(self.config.ranks)

    def train(self, mode: bool = True) -> FederatedModel:
        """Set the flag only: submodules stay in eval mode (no dropout). With gradient
        checkpointing, the checkpointed blocks themselves follow ``mode`` (transformers
        checkpoints only in training mode); their submodules stay in eval mode."""
        self.training = mode
        if not mode:
            self.router.keys = None  # evaluation and generation: no dropout
        if self.config.gradient_checkpointing:
            for module in self.model.modules():
                if getattr(module, "gradient_checkpointing", False) is True:
                    module.training = mode
        return self

    def client_layers(self) -> list[nn.Module]:
        """The layers holding per-client tensors: adapters first, then heads."""
        return [*self.adapters.values(), *self.heads.values()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The stacked per-client parameters (adapters, cores, heads)."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, routing: Routing | None = None, client_ids: Tensor | None = None,
                positions: Tensor | None = None, dropout_keys: Tensor | None = None, **inputs: Tensor):
        """Run the wrapped model with batch rows routed to client slots.

        Give either ``routing`` or ``client_ids`` (``(N,)``); with neither, every row
        uses slot 0. ``positions`` (``(P,)`` sequence positions): the output's logits are
        those positions' only, ``(N, P, vocab)`` (a loss on response tokens needs no others;
        the model computes only these where it can). ``dropout_keys`` (``(N,)``, from
        ``fedlora.kernels.row_keys``): the rows' adapter dropout masks, in training mode with
        ``--lora-dropout`` only (ignored otherwise).
        """
        first = next(iter(inputs.values()))                   # (N, T) ids or (N, T, d) embeddings
        if routing is None and client_ids is not None:
            routing = Routing.from_ids(client_ids.to(first.device))
        self.router.rows = first.shape[0]
        keyed = self.training and dropout_keys is not None and self.config.dropout > 0
        self.router.keys = dropout_keys.to(first.device) if keyed else None
        if positions is not None and self.cuts_logits:
            inputs["logits_to_keep"] = positions
        self.router.routing = routing
        if not self.checked:  # what this first pass reads and calls (check_bypassed)
            for layer in self.adapters.values():
                layer.called = layer.weight_read = False
        try:
            out = self.model(**inputs)
        finally:
            if not self.config.gradient_checkpointing:  # the backward pass recomputes with it
                self.router.routing = None
        if not self.checked:
            check_bypassed(self.adapters)
            self.checked = True
        if positions is not None and not self.cuts_logits:
            out.logits = out.logits[:, positions]
        return out

    def generate(self, **kwargs):
        """transformers' ``generate`` of the wrapped model with every row on slot 0."""
        self.unrouted()
        return self.model.generate(**kwargs)

    def unrouted(self) -> None:
        """Every row on slot 0 and no dropout, for passes that bypass :meth:`forward` (generation, the
        decoder's cached passes): no routing or dropout keys a training pass left."""
        self.router.routing = self.router.keys = None

    def set_plan(self, plan: AdapterPlan) -> None:
        """Train the factors ``plan.train`` from now on (e.g. RoLoRA's alternation)."""
        if plan.core != self.config.plan.core:
            raise ValueError(f"this model's adapters have factors {self.config.plan.factors};"
                             f" the plan needs {plan.factors}")
        for layer in self.adapters.values():
            layer.set_trainable(plan.train)
        self.config.plan = plan

    def freeze_heads(self, frozen: bool = True) -> None:
        """Stop (or restart) training the task heads (``--head frozen`` / ``public``): no
        gradients, no per-example gradients, no DP noise for them."""
        for head in self.heads.values():
            head.requires_grad_(not frozen)

    @torch.no_grad()
    def zero_heads(self) -> None:
        """Zero every slot's head weights and biases (``--head zero``)."""
        for head in self.heads.values():
            for key in head.slot_keys:
                getattr(head, key).zero_()

    def set_ranks(self, ranks: list[int]) -> None:
        """New per-slot ranks (same K, each ≤ the largest rank the model was built with)."""
        for layer in self.adapters.values():
            layer.set_ranks(ranks, self.config.alpha)
        self.config.ranks = list(ranks)

    @torch.no_grad()
    def reset_adapters(self, seed: int) -> None:
        """Fresh LoRA adapters in every slot (A drawn from ``seed``, B = 0).

        Layer i draws from its own generator seeded with ``seed + i``, and rows are
        drawn one by one, so a client's A depends neither on other clients' (padded)
        ranks nor on how many clients share the model.
        """
        for i, layer in enumerate(self.adapters.values()):
            layer.reset_slots(torch.Generator().manual_seed(int(seed) + i))


def draw_seed(gen: torch.Generator) -> int:
    """One adapter-initialisation seed drawn from ``gen``."""
    return int(torch.randint(0, 2**62, (1,), generator=gen))
