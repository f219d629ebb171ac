"""``fedlora-plan``'s saved activations against a real forward, family by family, on toy models.

    python benchmarks/plan_families.py [--families qwen2,gpt2,...] [--out runs/plan-families]

Each family is built at toy size (2 blocks 64 wide, 4 heads, a 1,024-token vocabulary so that the
blocks, not the logits, carry the count; random weights, a word-level tokenizer of as many tokens)
in ``OUT/<family>``, and one client's ``--task causal-lm`` step of 4 rows × 64 tokens, fp32, is
counted twice: by the planner (:func:`fedlora.plan.memory.saved_bytes`, no weight read) and as the
storages autograd keeps for the backward pass when a real forward ends (the counter of
``tests/fedlora/test_plan_memory.py``), with LoRA on the default targets (q/v) and on
``all-linear``. A ratio under 1 is a plan too small: on a GPU the simulator would pack more clients
into a pass than fit. Seconds in all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from fedlora.job.schema import JobConfig
from fedlora.plan.memory import saved_bytes
from fedlora.plan.shape import build_shape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the counter lives with the tests
from tests.fedlora.test_plan_memory import _kept_for_backward  # noqa: E402

#: The toy block: 64 wide, 4 heads (1 or 2 KV heads where the family groups them), a 128-wide MLP.
B = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
     "max_position_embeddings": 128}
MOE = {"num_experts": 4, "num_experts_per_tok": 2}
#: Family -> (config class, its toy sizes).
FAMILIES = {
    "qwen2": ("Qwen2Config", {**B, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {**B, "num_key_value_heads": 2}),
    "gemma": ("GemmaConfig", {**B, "num_key_value_heads": 1, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**B, "num_key_value_heads": 1, "head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", {**B, "num_key_value_heads": 1, "head_dim": 16}),
    "phi": ("PhiConfig", B),
    "phi3": ("Phi3Config", {**B, "num_key_value_heads": 4}),
    "gpt_neox": ("GPTNeoXConfig", B),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "opt": ("OPTConfig", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 128,
                          "word_embed_proj_dim": 64, "max_position_embeddings": 128}),
    "bloom": ("BloomConfig", {"hidden_size": 64, "n_layer": 2, "n_head": 4}),
    "mixtral": ("MixtralConfig", {**B, "num_key_value_heads": 2, "num_local_experts": 4,
                                  "num_experts_per_tok": 2}),
    "olmoe": ("OlmoeConfig", {**B, "num_key_value_heads": 2, **MOE}),
    "qwen2_moe": ("Qwen2MoeConfig", {**B, "num_key_value_heads": 2, **MOE, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 64}),
}


def toy_tokenizer(size: int = 1024):
    """A word-level tokenizer of ``size`` tokens (``[PAD]``, ``[UNK]``, ``w2`` ...): a toy model's
    embeddings hold every id it gives (fedlora refuses a tokenizer with more tokens than that)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, size)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]")


def build(family: str, path: Path, tokenizer) -> Path:
    """Save ``family``'s toy model (seeded) and ``tokenizer`` in ``path``."""
    name, sizes = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, name)(vocab_size=1024, pad_token_id=0, **sizes)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ratio(model: Path, targets: list[str] | None) -> tuple[int, int]:
    """``(planned, kept)`` bytes of one client's causal-lm step on ``model``."""
    cfg = JobConfig(model=str(model), task="causal-lm", batch_size=4, max_length=64, rank=4,
                    target_modules=targets)
    return saved_bytes(build_shape(cfg), cfg, 3, checkpointing=False), _kept_for_backward(cfg, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--out", type=Path, default=Path("runs/plan-families"))
    args = p.parse_args(argv)
    tokenizer = toy_tokenizer()
    print("| family | LoRA on | planned | kept by a real forward | planned / kept |")
    print("|---|---|---:|---:|---:|")
    for family in args.families.split(","):
        model = build(family, args.out / family, tokenizer)
        for targets in (None, ["all-linear"]):
            planned, kept = ratio(model, targets)
            print(f"| {family} | {'all-linear' if targets else 'q/v'} | {planned / 2**20:.2f} MiB |"
                  f" {kept / 2**20:.2f} MiB | {planned / kept:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
