"""fedlora: federated LoRA fine-tuning with LoRA-aware aggregation."""

__version__ = "0.1.0"
