"""A job's memory from its model's shape: the frozen base once per pass, and per client its
adapter, gradients, optimizer state and activations.

Notation: ``b`` bytes per element of the compute dtype (2 with ``--precision bf16``, else 4);
per client ``B`` rows of ``T = --max-length`` tokens (``--batch-size`` examples of the task's rows
each: a DPO pair is two), ``N = B T``; ``L`` blocks of
hidden size ``h``, query width ``a``, key/value width ``kv``, ``n_h`` heads, intermediate size
``m``; vocabulary ``V``; ``P`` positions per row whose logits the loss reads (``T − 1`` for
``--task causal-lm``; for ``--task sft`` and ``dpo`` the response's, ``--response-tokens``: only those
positions' logits are computed). All in bytes::

    base        = Σ_quantized q(numel, rows) + d · Σ_other numel       (d = 2 for bf16, else 4)
                  q: nf4/fp4 numel/2 + 4 numel/64 (a float32 absmax per block of 64); double quant
                  numel/2 + numel/64 + 4 numel/16384; int8 numel + 4 rows; none d numel;
                  with --quant-correction R, 4 min(R, d_out, d_in) (d_out + d_in) more per quantized layer
    folds       = 4 k (d_out + d_in) per adapted layer over a quantized base, for a strategy that folds
                  (FLoRA, FedEx-LoRA): the exact residual beside it after the job's rounds, of rank
                  k = min(Σ_rounds fold_rank, d_out, d_in, --fold-rank) at most (less only where the
                  clients' factors are dependent); an unquantized base adds the folds to its weights (0)
    adapter     = 4 × the slot's adapter and head numbers (LoRA r (d_in + d_out) per layer;
                  LoRA-SB r², its frozen A and B once per pass)
    gradients   = 4 × trainable numbers;  optimizer = 8 × trainable (AdamW), 4 × (SGD)
    s           = N [8h + b(2a + 2kv) + 4 n_h + g bm + b Σ_inputs d_in + b Σ_layers r (+ b(2h + a + m))]
    activations = L s + max(4Nh + logits, s)               without gradient checkpointing
                = L N (b h + e) + max(4Nh + logits, 2 s)   with it (e = b(2h + a + m) on 8 bits, else 0)
    logits      = B P V (b + 12)
    dp          = N b Σ_layers d_out + 4 E × trainable (--dp sample; E = --batch-size examples)
                  + 4 N Σ_layers d_in with --lora-dropout (the hooks' dropped-out inputs)
    dropout     = N [(4 Σ_layers d_in − 4 Σ_inputs d_in, in fp32 only) + Σ_layers d_in] more in s
                  with --lora-dropout

``s`` is one block's tensors kept for the backward pass, counted op by op on LLaMA's block
(RMSNorm, rotary attention, gated MLP, as in Mistral and Qwen2): each RMSNorm keeps an fp32 copy of
its input (``8h``; a LayerNorm under the CPU's bf16 autocast keeps a bf16 one, ``2bh``, and each
LayerNorm its mean and 1/std per token); the
attention keeps the rotated queries and keys, the values, its output and the log-sum-exp of each
head; the MLP its gate, SiLU(gate) and up projections (``g = 3``; an ungated MLP, BERT's or
GPT-2's, only its activation's input: ``g = 1``); LoRA the input of every
adapted layer (in fp32 the layers that read one tensor, q/k/v or gate/up, share it; under bf16
autocast each keeps its own copy) and its ``x Aᵀ``; an 8-bit base the input of every 8-bit layer
(4-bit and unquantized frozen layers keep none); bitsandbytes keeps those outside autograd's saved
tensors, so checkpointing does not drop them (``e``). Without checkpointing every block's ``s`` is
alive when the backward pass starts; with it, each block's input. The backward pass then peaks in
one of two phases: the loss and the head (``4Nh``, the final RMSNorm's fp32 input, absent from a
post-norm encoder, and ``logits``), which it frees before it reaches the blocks; or the blocks
(one block's gradients, another ``s``, and with checkpointing one recomputed block, ``2 s``).
:func:`saved_bytes` (what autograd keeps when the forward pass ends) is tested against the tensors
a real forward keeps, to 2%, and the whole step against the profiler's record of its allocations.
``logits``: the logits of the ``P`` positions in the compute dtype, their fp32 log-softmax (kept for
the backward pass) and the two fp32 gradients of the loss's backward. A quantized base also dequantizes one
layer's weight at a time (``b × numel`` of the largest, once per pass). ``dp``: DP-SGD keeps every
adapted layer's output gradient and every row's per-example gradient of each trainable tensor.
``dropout`` (``--lora-dropout``): each adapted layer keeps its own dropped-out input, in fp32 no longer
one tensor shared by the layers that read it (under bf16 autocast each already kept its own copy), and
its bool mask (a byte per entry; none in fact for the first block's layers whose input carries no
gradient, counted all the same).

This counts live tensors, what ``torch.cuda.max_memory_allocated`` measures on a GPU and the
profiler's allocation record on the CPU (``benchmarks/llm_memory.py``'s ``live peak``). On the CPU the
resident memory also holds what glibc's allocator keeps of freed blocks between live ones:
:data:`CPU_OVERHEAD` of the blocks' ``L s``, fitted on SmolLM2-135M (``benchmarks/llm_memory.py``,
``benchmarks/RESULTS.md``, 2026-12-02), added for ``--device cpu`` as a term of its own
(:attr:`MemoryPlan.allocator`). A BERT block (post-norm: its
two LayerNorms keep their inputs, like the RMSNorms) is counted by the same terms with ``g = 1``
(tested against a real forward, as LLaMA's). An eager attention (Gemma-2's) adds its ``T × T``
scores to ``s`` (:func:`eager_attention_bytes`), a soft-capped model its logits' tanh, and GPT-2's
``gelu_new`` three more ``m``-wide tensors to ``g`` (each tested against a real forward). Other block
types are an approximation. A mixture of experts (a config with ``num_experts_per_tok``) counts, in
place of ``g m``, each of a token's k experts' gated MLP and weighted output and a shared expert
(:func:`mlp_numbers`), and its router's fp32 softmax (tested against a real forward on Mixtral).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from fedlora.job.schema import JobConfig
from fedlora.plan.shape import ModelShape, build_shape
from fedlora.strategies import STRATEGIES
from fedlora.tasks import TASKS

#: Share of the blocks' saved activations ``L s`` that the resident memory of a CPU step adds to its
#: live tensors (glibc keeps freed blocks it cannot return), without and with checkpointing; fitted
#: on SmolLM2-135M in ``benchmarks/llm_memory.py`` (RESULTS.md, 2026-12-02).
CPU_OVERHEAD = {False: 0.5, True: 0.25}
#: Which tensor each LLaMA-style layer reads, so that layers reading one tensor are counted once.
INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
          "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid",
          "query": "attn_in", "key": "attn_in", "value": "attn_in"}


def quantized_bytes(numel: int, rows: int, quantize: str, double_quant: bool) -> int:
    """Bytes of one linear weight of ``numel`` numbers and ``rows`` outputs stored by ``--quantize``."""
    if quantize in ("nf4", "fp4"):
        blocks = math.ceil(numel / 64)
        scales = blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks
        return math.ceil(numel / 2) + scales
    if quantize == "int8":
        return numel + 4 * rows
    raise ValueError(f"not a quantized base: {quantize!r}")


def base_bytes(shape: ModelShape, cfg: JobConfig) -> int:
    """The frozen base's bytes: its quantized linear layers and every other tensor in the load dtype."""
    d = 2 if cfg.precision == "bf16" else 4
    total = 0
    for t in shape.base:
        if t.rows and cfg.quantize != "none":
            total += quantized_bytes(t.numel, t.rows, cfg.quantize, cfg.double_quant)
            d_in = t.numel // t.rows                        # its fp32 U and V, of rank ≤ min(d_out, d_in)
            total += 4 * min(cfg.quant_correction, t.rows, d_in) * (t.rows + d_in)
        else:
            total += d * t.numel
    return total


def fold_bytes(shape: ModelShape, cfg: JobConfig) -> int:
    """The folded residual a quantized base holds beside its adapted layers after the job's rounds
    (module docstring): each round adds its fold's rank (``Strategy.fold_rank`` of its clients' ranks)."""
    strategy = STRATEGIES[cfg.strategy]
    if cfg.quantize == "none" or not strategy.folds:
        return 0
    rank = sum(strategy.fold_rank([cfg.rank_of(c) for c in cfg.sampled(r)]) for r in range(1, cfg.rounds + 1))
    total = 0
    for d_out, d_in in shape.layers.values():
        k = min(rank, d_out, d_in, cfg.fold_rank or rank)
        total += 4 * k * (d_out + d_in)
    return total


def adapter_numbers(shape: ModelShape) -> tuple[int, int, int]:
    """``(per client, trainable per client, shared)`` numbers of the adapters and heads of one slot."""
    per, trainable, shared = 0, 0, 0
    for layer in shape.fm.client_layers():
        for p in layer.parameters(recurse=False):  # not an adapted layer's frozen base
            per += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        for name in ("sb_A", "sb_B"):
            shared += getattr(layer, name).numel() if hasattr(layer, name) else 0
    return per, trainable, shared


def block_bytes(shape: ModelShape, cfg: JobConfig) -> int:
    """``s / N``: one block's bytes kept for the backward pass per token (module docstring)."""
    dims, b = shape.dims(), compute_bytes(cfg)
    h, a, kv = dims["hidden"], dims["attention"], dims["kv"]
    nb = norm_bytes(shape, cfg)
    per = 2 * nb * h + b * (2 * a + 2 * kv + mlp_numbers(shape)) + 4 * dims["heads"] + router_bytes(shape)
    if not shape.rms_norm:
        per += 2 * 2 * nb  # each LayerNorm's mean and 1/std per token
    inputs = {}
    for name, (_, d_in) in shape.layers.items():
        parent, _, short = name.rpartition(".")
        key = f"{parent}.{INPUTS.get(short, short)}" if b == 4 else name   # bf16 autocast: a copy each
        inputs[key] = d_in
    layers = dims["layers"]
    per += b * (sum(inputs.values()) + max(cfg.client_ranks()) * len(shape.layers)) / layers
    if cfg.lora_dropout:  # each layer's own dropped-out input (fp32: no longer shared), and its mask
        adapted = sum(d_in for _, d_in in shape.layers.values())
        per += ((4 * adapted - b * sum(inputs.values()) if b == 4 else 0) + adapted) / layers
    if cfg.quantize == "int8":  # in fp32 LoRA's copy of an input is the 8-bit layer's own tensor
        shared = {k.rpartition(".")[2] for k in inputs} if b == 4 else set()
        per += int8_input_bytes(shape, cfg, shared)
    return int(per)


def norm_bytes(shape: ModelShape, cfg: JobConfig) -> int:
    """Bytes per element of the input each of a block's two norms keeps: fp32 for an RMSNorm (it
    casts to fp32 itself) and for a LayerNorm under CUDA's autocast (which runs it in fp32); under
    the CPU's bf16 autocast a LayerNorm runs, and keeps its input, in bf16."""
    return 4 if shape.rms_norm or cfg.device.startswith("cuda") else compute_bytes(cfg)


def mlp_numbers(shape: ModelShape) -> int:
    """Numbers a block's MLP keeps per token: ``g m`` (:func:`mlp_tensors`); for a mixture of experts
    (a config with ``num_experts_per_tok`` k) what each of the token's k experts keeps, its gated
    MLP's ``gate_up`` output and activation (``3 m_e``, ``m_e`` the expert's width) and the down
    projection's output it weights (``h``), and a shared expert's gated MLP (Qwen2-MoE's, ``3 m_s``)."""
    text = shape.text_config
    dims = shape.dims()
    k = getattr(text, "num_experts_per_tok", None)
    if not k or not _experts(text):
        return mlp_tensors(shape) * dims["intermediate"]
    width = getattr(text, "moe_intermediate_size", None) or dims["intermediate"]
    shared = getattr(text, "shared_expert_intermediate_size", None) or 0
    return int(k) * (3 * int(width) + dims["hidden"]) + 3 * int(shared)


def router_bytes(shape: ModelShape) -> int:
    """Bytes a mixture of experts' router keeps per token: its fp32 softmax over the ``E`` experts."""
    return 4 * _experts(shape.text_config)


def _experts(text) -> int:
    return int(getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 0)


def mlp_tensors(shape: ModelShape) -> int:
    """``g``: the ``m``-wide tensors a block's MLP keeps: a gated one its gate, the activation of
    the gate and the up projection (3); an ungated one its activation's input (1); and what an
    activation written as tensor arithmetic keeps besides (:data:`ACTIVATION_TENSORS`)."""
    extra = max((ACTIVATION_TENSORS.get(type(m).__name__, 0) for m in shape.fm.modules()), default=0)
    return (3 if shape.gated_mlp else 1) + extra


#: ``m``-wide tensors an activation keeps beyond its input, where transformers writes it out in
#: tensor arithmetic: GPT-2's ``gelu_new``, ``0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))``, keeps the
#: tanh, ``0.5 x`` and ``1 + tanh`` (counted against a real forward). A fused one keeps its input only.
ACTIVATION_TENSORS = {"NewGELUActivation": 3}


def eager_attention_bytes(shape: ModelShape, cfg: JobConfig) -> int:
    """Bytes per row that one block's attention keeps in ``T × T`` scores when it runs eagerly (Gemma-2,
    whose soft-capping SDPA lacks): the fp32 softmax, in bf16 its cast copy, and a soft-capped
    model's tanh, ``n_h T² (4 [+ b] [+ b])``; 0 under SDPA or flash attention (they keep no scores)."""
    text = shape.text_config
    if getattr(text, "_attn_implementation", None) != "eager":
        return 0
    b = compute_bytes(cfg)
    per = 4 + (b if b == 2 else 0) + (b if getattr(text, "attn_logit_softcapping", None) else 0)
    return shape.dims()["heads"] * cfg.max_length ** 2 * per


def logit_copies(shape: ModelShape) -> int:
    """Logit-sized tensors the model itself keeps in the compute dtype: 1, a soft-capped one's
    (Gemma-2: ``tanh(z / c) c``) its tanh too."""
    return 1 if getattr(shape.text_config, "final_logit_softcapping", None) else 0


def int8_input_bytes(shape: ModelShape, cfg: JobConfig, shared: Collection[str] = ()) -> int:
    """Bytes per token of one block's inputs that its 8-bit layers keep, leaving out ``shared`` ones.

    bitsandbytes' ``MatMul8bitLt`` keeps its input as an attribute of its autograd context, not as
    a saved tensor, so gradient checkpointing does not drop it: with checkpointing every block
    still holds the inputs of its 8-bit layers (q/k/v's, o's, gate/up's and down's), ``b(2h + a + m)``.
    """
    if cfg.quantize != "int8":
        return 0
    dims = shape.dims()
    eight = {"attn_in": dims["hidden"], "attn_out": dims["attention"], "mlp_in": dims["hidden"],
             "mlp_mid": dims["intermediate"]}
    return compute_bytes(cfg) * sum(v for k, v in eight.items() if k not in shared)


def compute_bytes(cfg: JobConfig) -> int:
    """``b``: bytes per element of what the blocks compute (bf16 under ``--precision bf16``)."""
    return 2 if cfg.precision == "bf16" else 4


def batch_rows(cfg: JobConfig) -> int:
    """``B``: the model rows of one client's step, ``--batch-size`` examples of the task's rows each."""
    return cfg.batch_size * TASKS[cfg.task].rows_per_example


def logit_positions(cfg: JobConfig, response_tokens: int) -> int:
    """``P``: positions per row whose logits the loss reads."""
    if cfg.task in ("sft", "dpo"):
        return min(response_tokens, cfg.max_length - 1)
    return cfg.max_length - 1 if cfg.task == "causal-lm" else 0


@dataclass
class MemoryPlan:
    """Bytes of a job's pass (see the module docstring): ``base``, ``folds``, ``shared`` and
    ``transient`` once per pass, the rest per client; ``activations`` with the job's
    ``--gradient-checkpointing``, ``activations_other`` with the other setting (both live tensors);
    ``allocator`` what the CPU's allocator keeps beside a step's live tensors (0 on a GPU); ``dp`` is
    counted in :attr:`per_client` under ``--dp sample`` only."""

    base: int
    shared: int
    transient: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    activations_other: int
    dp: int
    dp_on: bool = False
    allocator: int = 0
    folds: int = 0

    @property
    def per_client(self) -> int:
        """One more client in the pass: its adapter, gradients, optimizer state, activations, the CPU
        allocator's share (and DP)."""
        dp = self.dp if self.dp_on else 0
        return self.adapter + self.gradients + self.optimizer + self.activations + self.allocator + dp

    @property
    def fixed(self) -> int:
        """What a pass holds whatever its clients: the base (with the folds beside a quantized one),
        shared factors, one dequantized layer."""
        return self.base + self.folds + self.shared + self.transient

    def pass_bytes(self, clients: int) -> int:
        """A pass of ``clients`` clients."""
        return self.fixed + clients * self.per_client

    def largest_pass(self, memory: int) -> int:
        """The most clients a pass can hold in ``memory`` bytes (0: not even one)."""
        return max(0, (memory - self.fixed) // self.per_client)

    @property
    def weight_bytes(self) -> int:
        """A one-client model's parameters and buffers (``benchmarks/llm_memory.py``'s ``weights``)."""
        return self.base + self.folds + self.shared + self.adapter

    @property
    def step_bytes(self) -> int:
        """What a one-client step adds to the loaded model (the benchmark's ``step peak``: resident
        memory on the CPU)."""
        return self.per_client - self.adapter + self.transient

    @property
    def live_step_bytes(self) -> int:
        """:attr:`step_bytes` in live tensors only (the benchmark's ``live peak``; on a GPU the same)."""
        return self.step_bytes - self.allocator


def saved_parts(shape: ModelShape, cfg: JobConfig, response_tokens: int,
                checkpointing: bool) -> tuple[int, int]:
    """What autograd keeps for the backward pass when one client's forward pass ends, in two parts:
    the blocks' (every block's ``s``; with checkpointing each block's input, ``N b h``, and an 8-bit
    base's layer inputs), and the head's (the final norm's fp32 input, in a model with one, the fp32
    log-softmax of the ``P`` positions' logits and the model's own logit copies), which the backward
    pass frees before it reaches the blocks."""
    dims, b = shape.dims(), compute_bytes(cfg)
    n, layers = batch_rows(cfg) * cfg.max_length, dims["layers"]
    if checkpointing:  # each block's input, and what its 8-bit layers keep past the checkpoint
        blocks = layers * n * (b * dims["hidden"] + int8_input_bytes(shape, cfg))
    else:
        blocks = layers * (n * block_bytes(shape, cfg) + batch_rows(cfg) * eager_attention_bytes(shape, cfg))
    positions = batch_rows(cfg) * logit_positions(cfg, response_tokens) * dims["vocab"]
    logits = (4 + b * logit_copies(shape)) * positions
    final = 4 * n * dims["hidden"] if shape.final_norm else 0
    return blocks, final + logits


def saved_bytes(shape: ModelShape, cfg: JobConfig, response_tokens: int, checkpointing: bool) -> int:
    """What autograd keeps for the backward pass when one client's forward pass ends (both
    :func:`saved_parts`)."""
    return sum(saved_parts(shape, cfg, response_tokens, checkpointing))


def block_step_bytes(shape: ModelShape, cfg: JobConfig) -> int:
    """``s`` of one client's batch: one block's saved tensors, its eager attention scores included."""
    return batch_rows(cfg) * (cfg.max_length * block_bytes(shape, cfg) + eager_attention_bytes(shape, cfg))


def activation_bytes(shape: ModelShape, cfg: JobConfig, response_tokens: int, checkpointing: bool) -> int:
    """One client's live activations at the peak of its step (module docstring): the blocks' saved
    tensors (:func:`saved_parts`), then the larger of the backward pass's two phases. First the loss
    and the head: their saved tensors, the logits and the loss's two fp32 gradients, all freed once
    they have run. Then the blocks: one block's gradients, and with checkpointing its recomputed ``s``."""
    dims, b = shape.dims(), compute_bytes(cfg)
    blocks, head = saved_parts(shape, cfg, response_tokens, checkpointing)
    loss = head + batch_rows(cfg) * logit_positions(cfg, response_tokens) * dims["vocab"] * (b + 8)
    return blocks + max(loss, (2 if checkpointing else 1) * block_step_bytes(shape, cfg))


def allocator_bytes(shape: ModelShape, cfg: JobConfig) -> int:
    """What the CPU's allocator keeps beside a step's live tensors: :data:`CPU_OVERHEAD` of the
    blocks' ``L s`` on ``--device cpu``, nothing on a GPU (its caching allocator's reserve is not
    counted: ``max_memory_allocated`` is the live tensors)."""
    if cfg.device.startswith("cuda"):
        return 0
    blocks = shape.dims()["layers"] * block_step_bytes(shape, cfg)
    return int(CPU_OVERHEAD[cfg.gradient_checkpointing] * blocks)


def plan_memory(shape: ModelShape, cfg: JobConfig, response_tokens: int) -> MemoryPlan:
    """The :class:`MemoryPlan` of job ``cfg`` on the model ``shape``."""
    per, trainable, shared = adapter_numbers(shape)
    b = compute_bytes(cfg)
    largest = max((t.numel for t in shape.base if t.rows), default=0)
    n = batch_rows(cfg) * cfg.max_length  # per-example gradients: one per example (a DPO pair shares one)
    dp = n * b * sum(d_out for d_out, _ in shape.layers.values()) + 4 * cfg.batch_size * trainable
    if cfg.lora_dropout:  # the hooks keep each layer's dropped-out input, in fp32
        dp += 4 * n * sum(d_in for _, d_in in shape.layers.values())
    return MemoryPlan(
        base=base_bytes(shape, cfg), shared=4 * shared,
        transient=b * largest if cfg.quantize != "none" else 0,
        adapter=4 * per, gradients=4 * trainable, optimizer=(4 if cfg.optimizer == "sgd" else 8) * trainable,
        activations=activation_bytes(shape, cfg, response_tokens, cfg.gradient_checkpointing),
        activations_other=activation_bytes(shape, cfg, response_tokens, not cfg.gradient_checkpointing),
        dp=dp, dp_on=cfg.dp == "sample", allocator=allocator_bytes(shape, cfg), folds=fold_bytes(shape, cfg))


def default_response_tokens(cfg: JobConfig) -> int:
    """``--response-tokens`` when not given: a quarter of ``--max-length``."""
    return max(1, cfg.max_length // 4)


def predict_job(cfg: JobConfig, response_tokens: int | None = None, num_labels: int = 2) -> MemoryPlan:
    """:func:`plan_memory` of ``cfg`` on its model built on the meta device (no weights read)."""
    tokens = default_response_tokens(cfg) if response_tokens is None else response_tokens
    return plan_memory(build_shape(cfg, num_labels), cfg, tokens)
