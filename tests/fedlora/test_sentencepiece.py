"""SentencePiece-style tokenizers (LLaMA-2 and Mistral-7B-v0.1 "legacy", Gemma): a beginning-of-text
token before every text, byte fallback, no pad token. Each is built in this process with the
``tokenizers`` library (no ``sentencepiece``, no download)."""

from __future__ import annotations

import json

import pytest

from fedlora.data.loading import TextDataset
from fedlora.job.schema import JobConfig
from fedlora.tasks import get_task
from fedlora.tasks.sft import cut_prompts
from tests.fedlora.sp_tokenizers import gemma_tokenizer, llama2_tokenizer, t5_tokenizer


@pytest.fixture(scope="module")
def llama2_tok():
    return llama2_tokenizer()


def test_the_llama2_tokenizer_is_sentencepiece_like(llama2_tok):
    # the dummy prefix, <s> first, byte fallback for what the vocabulary lacks
    ids = llama2_tok("paris é")["input_ids"]
    assert llama2_tok.convert_ids_to_tokens(ids)[:2] == ["<s>", "▁paris"]
    assert "<0xC3>" in llama2_tok.convert_ids_to_tokens(ids)
    assert llama2_tok.decode(ids, skip_special_tokens=True) == "paris é"


def test_a_cut_prompt_keeps_its_beginning_of_text_token():
    # Act: prompts led by <s> (id 1) cut to fit 6 tokens with 2 for the completion
    out, cut = cut_prompts([[1, 10, 11, 12, 13, 14], [1, 10], [7, 8, 9, 10, 11]], [2, 2, 2], 6, bos=1)

    # Assert: <s> stays, the tokens after it go; a prompt that fits is as it was; one without <s> as before
    assert out == [[1, 12, 13, 14], [1, 10], [8, 9, 10, 11]]
    assert cut == [True, False, True]
    assert cut_prompts([[1, 10, 11, 12]], [5], 6, bos=1)[0] == [[12]]   # no room for <s> and a token
    assert cut_prompts([[1, 10, 11, 12]], [4], 6, bos=1)[0] == [[1, 12]]


def test_sft_and_mc_prompts_cut_to_fit_still_start_with_bos(llama2_tok, tmp_path):
    # Prepare: LLaMA-2's template writes <s>; prompts far longer than --max-length 16
    long = " ".join(["the capital city of france is a question"] * 4)
    rows = [{"question": f"{long} {i}", "choices": ["paris", "berlin"], "answer": i % 2} for i in range(4)]
    spec = tmp_path / "mc.jsonl"
    spec.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("sft")
    cfg = JobConfig(task="sft", model="unused", max_length=16)
    ds = task.load(str(spec), cfg)

    # Act
    prompts, completions = task.pieces(llama2_tok, ds, cfg)
    mc = task.eval_set(llama2_tok, ds, JobConfig(task="sft", model="unused", max_length=16, eval="mc"))
    dpo, dpo_cfg = get_task("dpo"), JobConfig(task="dpo", model="unused", max_length=16)
    pairs = dpo.encode(llama2_tok, dpo.load(str(_pairs(tmp_path, long)), dpo_cfg), dpo_cfg)

    # Assert: every cut prompt still starts with <s>, once, and fits with its completion
    bos = llama2_tok.bos_token_id
    for p, c in zip(prompts, completions, strict=True):
        assert p[0] == bos and p.count(bos) == 1 and len(p) + len(c) == 16
    assert all(p[0] == bos and p.count(bos) == 1 for p in mc.prompts)
    assert (pairs["input_ids"][:, :, 0] == bos).all()


def _pairs(tmp_path, long: str):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{long} {i}", "chosen": "paris", "rejected": "berlin"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_without_a_leading_bos_are_cut_as_before(llama2_tok, tmp_path):
    # a tokenizer whose texts do not start with <s> (a template that does not write it): plain left cut
    tok = llama2_tokenizer("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ds = TextDataset(["the capital city of france is " * 6], None, None, ["paris"])
    cfg = JobConfig(task="sft", model="unused", max_length=8)
    prompts, completions = get_task("sft").pieces(tok, ds, cfg)
    whole = get_task("sft").tokenized(tok, ds, cfg)[0][0]
    assert prompts[0] == whole[len(whole) - (8 - len(completions[0])):]


def test_an_unnamed_special_end_of_turn_stops_greedy_answers(tmp_path):
    # Prepare: Gemma's turns end with <end_of_turn>, an added special token the tokenizer does not name
    # (not in its special-tokens map); decoding drops it, so an answer must stop there too
    tok = gemma_tokenizer()
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end not in tok.all_special_ids
    ds = TextDataset(["what is the capital of france", "what is the capital of germany"], None, None,
                     ["paris", "berlin"])
    cfg = JobConfig(task="sft", model="unused", max_length=32)

    # Act
    data = get_task("sft").eval_set(tok, ds, cfg)

    # Assert: the references end with it, and it is a stop token
    assert all(c[-1] == end for c in data.completions)
    assert end in data.stop_ids
    assert tok.decode([*data.completions[0]], skip_special_tokens=True) == "paris"


def test_a_t5_is_refused_as_a_causal_lm_in_one_line_naming_classification(tmp_path):
    # Prepare: a tiny T5 (an encoder-decoder) with its Unigram tokenizer
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from fedlora.errors import UserError
    from fedlora.models.hub import load_model

    tok = t5_tokenizer()
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                        num_heads=2, decoder_start_token_id=0)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    # Act / Assert: --task sft (a causal LM) is refused, saying what takes it; classification loads it
    with pytest.raises(UserError, match=r"need a decoder; --task classification takes it") as info:
        load_model(str(tmp_path), "causal-lm")
    assert "\n" not in str(info.value) and "AutoModelForCausalLM;" in str(info.value)
    model, _, _, _ = load_model(str(tmp_path), "sequence-classification", num_labels=2)
    assert type(model).__name__ == "T5ForSequenceClassification"


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "metaspace-first"])
def test_plain_prompts_encode_as_the_tokenizer_encodes_them(legacy):
    # Prepare: no chat template (a base model): --chat-template plain, <s> led
    tok = llama2_tokenizer(None, legacy=legacy)
    texts = ["what is the capital of france", "good film"]
    ds = TextDataset(texts, None, None, ["paris", "positive"])
    cfg = JobConfig(task="sft", model="unused", chat_template="plain", max_length=32)

    # Act
    prompts, _ = get_task("sft").tokenized(tok, ds, cfg)

    # Assert: as the tokenizer encodes each prompt's text, <s> and the first word's "▁" included
    assert prompts == [tok(t + "\n")["input_ids"] for t in texts]
    assert tok.convert_ids_to_tokens(prompts[0])[:2] == ["<s>", "▁what"]
