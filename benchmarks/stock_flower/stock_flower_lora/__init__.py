"""Stock Flower federated LoRA app: the baseline for ``benchmarks/deploy_overhead.py``."""

import os

# Set before anything imports huggingface_hub / transformers: nothing may be downloaded.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
