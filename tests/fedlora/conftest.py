"""Fixtures of the fedlora package's tests."""

from __future__ import annotations

import pytest
from transformers import AutoModelForSequenceClassification


@pytest.fixture(scope="session")
def base(tiny_bert_dir):
    """The tiny BERT with a 3-label head and no dropout, so that a model in train mode (Opacus
    needs it) and one in eval mode compute the same function. Tests copy it before changing it."""
    return AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
