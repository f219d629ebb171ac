"""Config-only presets: the published shapes of common 1–8B LLMs, for planning (no weights).

Each preset is the part of the model's ``config.json`` (on its Hugging Face model page) that sets
its tensors' shapes: hidden and intermediate sizes, layers, attention and key/value heads,
vocabulary, tied embeddings, q/k/v biases. ``fedlora-plan --model NAME`` builds the model from it on
the meta device; nothing is downloaded and no weight exists.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig

#: Preset name -> ``(the model it describes, its config values)``.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "tie_word_embeddings": False, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0}),
    "mistral-7b": ("mistralai/Mistral-7B-v0.3", {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
        "tie_word_embeddings": False, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "sliding_window": None}),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "tie_word_embeddings": False, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "use_sliding_window": False}),
    "smollm2-1.7b": ("HuggingFaceTB/SmolLM2-1.7B", {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152,
        "tie_word_embeddings": True, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 130000.0}),
}


def preset_config(name: str):
    """The transformers config of preset ``name`` (:data:`PRESETS`).

    Raises
    ------
    KeyError
        When ``name`` is not a preset.
    """
    values = dict(PRESETS[name][1])
    return AutoConfig.for_model(values.pop("model_type"), **values)
