"""``benchmarks/tokenize_cut.py``: both encodings of long texts compared, and the table it prints."""

from __future__ import annotations

from bench_scripts import load_script
from transformers import AutoTokenizer

tokenize_cut = load_script("tokenize_cut")


def test_long_texts_give_the_same_tensors_both_ways(tiny_bert_dir):
    # Prepare: 12 texts of 300 words, cut well inside them at max_length 8 (128 characters)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = [" ".join(f"word{i}x{j}" for j in range(300)) for i in range(12)]
    # Execute
    row = tokenize_cut.measure(tok, texts, 8, repeats=1)
    # Assert
    assert row["same"] and row["max_length"] == 8 and row["whole_s"] > 0 and row["cut_s"] > 0


def test_the_table_prints_each_length_and_its_ratio():
    rows = [{"max_length": 32, "whole_s": 2.0, "cut_s": 0.25, "ratio": 8.0, "same": True},
            {"max_length": 128, "whole_s": 2.0, "cut_s": 0.5, "ratio": 4.0, "same": False}]
    text = tokenize_cut.table(rows, 2225, 2262.4)
    assert text.splitlines()[0].startswith("BBC News: 2225 articles, 2262 characters")
    assert "| 32 | 2.00 | 0.25 | 8.0× | yes |" in text and "| 128 | 2.00 | 0.50 | 4.0× | NO |" in text
