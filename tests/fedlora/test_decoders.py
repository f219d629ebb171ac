"""Chat LLM families beyond LLaMA, at toy size: a round of FLoRA instruction tuning on every linear
layer of the blocks, exported and loaded by PEFT onto the same base, gives fedlora's logits. The
families differ where adapters go wrong: fused q/k/v (Phi-3, GPT-NeoX), grouped KV heads (Qwen2,
Mistral), sandwich norms and logit soft-capping (Gemma-2), an MLP on flattened tokens (OPT) and a
mixture of experts with a shared expert (Qwen2-MoE)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.models.export import export_model
from fedlora.simulations.cli import build_parser, check_args
from fedlora.simulations.engine import train

peft = pytest.importorskip("peft")

#: One 16-wide block with 2 heads (1 KV head where the family groups them) and a 32-wide MLP.
BLOCK = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
         "max_position_embeddings": 64}
#: Family -> (config class, sizes, a layer its all-linear adapters must include).
FAMILIES = {
    "qwen2": ("Qwen2Config", {**BLOCK, "num_key_value_heads": 1}, "model.layers.0.mlp.down_proj"),
    "mistral": ("MistralConfig", {**BLOCK, "num_key_value_heads": 1}, "model.layers.0.self_attn.k_proj"),
    "gemma2": ("Gemma2Config", {**BLOCK, "num_key_value_heads": 1, "head_dim": 8},
               "model.layers.0.mlp.gate_proj"),
    "phi3": ("Phi3Config", {**BLOCK, "num_key_value_heads": 2}, "model.layers.0.self_attn.qkv_proj"),
    "gpt_neox": ("GPTNeoXConfig", BLOCK, "gpt_neox.layers.0.attention.query_key_value"),
    "opt": ("OPTConfig", {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 32,
                          "word_embed_proj_dim": 16, "max_position_embeddings": 64},
            "model.decoder.layers.0.fc2"),
    "qwen2_moe": ("Qwen2MoeConfig", {**BLOCK, "num_key_value_heads": 1, "num_experts": 4,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 8,
                                     "shared_expert_intermediate_size": 16},
                  "model.layers.0.mlp.shared_expert.down_proj"),
}


def _save(path, family: str, tok) -> None:
    name, sizes, _ = FAMILIES[family]
    cfg = getattr(transformers, name)(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, **sizes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_flora_round_on_every_linear_layer_exports_what_peft_loads(family, tiny_chat_llama_dir,
                                                                     sentiment_tsv, tmp_path):
    # Prepare: the family at toy size, with the tiny chat LLaMA's tokenizer and chat template
    model = tmp_path / family
    _save(model, family, AutoTokenizer.from_pretrained(tiny_chat_llama_dir))
    run = tmp_path / "run"
    argv = ["--task", "sft", "--model", str(model), "--data", str(sentiment_tsv), "--out", str(run),
            "--text-column", "sentence", "--label-words", "0=negative,1=positive", "--strategy", "flora",
            "--target-modules", "all-linear", "--num-clients", "2", "--rounds", "1", "--local-steps", "2",
            "--batch-size", "4", "--rank", "4", "--max-length", "24", "--lr", "5e-2", "--eval-max", "4",
            "--quiet"]
    # Execute: the round (FLoRA folds it into the base), then the export, loaded by PEFT
    job, coord = train(check_args(build_parser().parse_args(argv)), run)
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = job.fm(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(model)(input_ids=ids).logits
    out = export_model(job.fm, coord.state, tmp_path / "adapter", str(model), "CAUSAL_LM")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out).eval()
    with torch.no_grad():
        loaded = theirs(input_ids=ids).logits
    # Assert: the layer the family is checked for is adapted; the aggregate is exact; PEFT's logits
    # are fedlora's, which the round moved far beyond their difference
    assert FAMILIES[family][2] in job.fm.adapters
    assert coord.rows[-1]["agg_error"] < 1e-6
    torch.testing.assert_close(loaded, ours, rtol=1e-4, atol=1e-4)
    assert (ours - plain).abs().max() > 100 * (loaded - ours).abs().max()


def test_a_dense_mlp_in_a_fused_mixture_of_experts_is_refused():
    # Prepare: a toy DeepSeek-V3 (weightless): block 0 has a dense MLP, block 1 fused experts and a shared
    # expert, whose gate_proj/up_proj/down_proj PEFT loads as the fused experts' (transformers 5)
    from fedlora.models.model import AdapterConfig, FederatedModel

    sizes = {**BLOCK, "num_hidden_layers": 2, "num_key_value_heads": 2, "n_routed_experts": 4,
             "num_experts_per_tok": 2, "moe_intermediate_size": 8, "first_k_dense_replace": 1,
             "kv_lora_rank": 8, "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
             "v_head_dim": 8, "n_group": 1, "topk_group": 1, "vocab_size": 100}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(**sizes))

    def wrap(*targets):
        return FederatedModel(model, AdapterConfig(ranks=[2], target_modules=list(targets)))

    # Execute / Assert: all-linear takes the dense MLP, refused in one line; the attention's layers pass
    with pytest.raises(ValueError, match=r"^PEFT would load the adapter of model\.layers\.0\.mlp\.gate_proj"
                                         r" onto this deepseek_v3 model's experts"):
        wrap("all-linear")
    assert len(wrap("q_b_proj", "kv_b_proj", "o_proj").adapters) == 6


def test_a_router_that_is_a_linear_layer_is_not_adapted():
    # Prepare: a toy PhiMoE, whose router is an nn.Linear returning (logits, weights, experts)
    from fedlora.errors import UserError
    from fedlora.models.model import AdapterConfig, FederatedModel

    config = transformers.PhimoeConfig(**BLOCK, num_key_value_heads=1, num_local_experts=4,
                                       num_experts_per_tok=2, vocab_size=100)
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_config(config).eval()(input_ids=ids).logits
    # Execute
    torch.manual_seed(0)
    fm = FederatedModel(AutoModelForCausalLM.from_config(config).eval(),
                        AdapterConfig(ranks=[2, 2], target_modules=["all-linear"]))
    with torch.no_grad():
        got = fm(input_ids=ids, client_ids=torch.tensor([0, 1])).logits
    # Assert: all-linear leaves the router out (it crashed on its tuple) and starts as the base
    assert len(fm.adapters) == 4 and not any("router" in name for name in fm.adapters)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a linear layer returning something else is refused in one line when adapted
    router = fm.model.model.layers[0].mlp.router
    fm.adapters["model.layers.0.self_attn.q_proj"].base = router
    with pytest.raises(UserError, match="^an adapted PhimoeTopKRouter returns a tuple, not a linear layer's"):
        fm(input_ids=ids)
