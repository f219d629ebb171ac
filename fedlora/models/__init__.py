"""Models: the batched LoRA layers, the federated model wrapper, loading from disk or GGUF, adapter
state, PEFT export.
"""
