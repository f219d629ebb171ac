"""Prompt and completion ids (fedlora.tasks.render): a completion has the ids it has in the whole
conversation, for a SentencePiece tokenizer with a dummy prefix (LLaMA-2's) as for byte-level BPE."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from fedlora.data.loading import TextDataset
from fedlora.job.schema import JobConfig
from fedlora.tasks import get_task
from fedlora.tasks.choice import choice_set
from fedlora.tasks.render import encode_pairs


def _pieces(tok, ids: list[int]) -> list[str]:
    return tok.convert_ids_to_tokens(ids)


def test_a_dummy_prefix_tokenizer_reads_a_completion_alone_with_a_space_token_it_never_reads_in_use(
        sp_tokenizer):
    # the premise: on its own, " positive</s>" starts with a lone '▁' (the dummy prefix before the
    # template's space); after "[/INST]" the space is the answer word's own
    alone = _pieces(sp_tokenizer, sp_tokenizer(" positive</s>", add_special_tokens=False)["input_ids"])
    assert alone == ["▁", "▁positive", "</s>"]


def test_sft_completions_are_the_whole_conversations_ids_after_the_prompts(sp_tokenizer):
    cfg = JobConfig(task="sft", model="unused", max_length=64)
    ds = TextDataset(texts=["great film", "awful plot"], labels=None, label_names=[],
                     responses=["positive", "negative"])
    prompts, completions = get_task("sft").tokenized(sp_tokenizer, ds, cfg)
    assert [_pieces(sp_tokenizer, c) for c in completions] == [["▁positive", "</s>"], ["▁negative", "</s>"]]
    for text, response, p, c in zip(ds.texts, ds.responses, prompts, completions, strict=True):
        user = [{"role": "user", "content": text}]
        whole = sp_tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}],
                                                 tokenize=False)
        assert p + c == sp_tokenizer(whole, add_special_tokens=False)["input_ids"]
        head = sp_tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert p == sp_tokenizer(head, add_special_tokens=False)["input_ids"]    # what generation starts from
        assert _pieces(sp_tokenizer, p)[0] == "<s>"


def test_mc_choices_are_read_after_the_templates_space_as_in_the_answer(sp_tokenizer, tmp_path):
    spec = tmp_path / "mc.jsonl"
    row = {"question": "great film", "choices": ["negative", "positive"], "answer": 1}
    spec.write_text(json.dumps(row) + "\n")
    task, cfg = get_task("sft"), JobConfig(task="sft", model="unused", eval="mc", max_length=64)
    data = choice_set(sp_tokenizer, task.load(str(spec), cfg), cfg)
    assert [_pieces(sp_tokenizer, c) for c in data.choices[0]] == [["▁negative"], ["▁positive"]]
    # a template that writes the answer straight after "[/INST]": the choice has no space before it
    plain = AutoTokenizer.from_pretrained(_saved(sp_tokenizer, tmp_path))
    plain.chat_template = sp_tokenizer.chat_template.replace("' ' + m['content']", "m['content']")
    data = choice_set(plain, task.load(str(spec), cfg), cfg)
    whole = plain("[INST] great film [/INST]positive", add_special_tokens=False)["input_ids"]
    assert data.prompts[0][1:] + data.choices[0][1] == whole       # [1:]: the template's <s>


def _saved(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_a_token_across_the_boundary_leaves_the_completion_tokenized_alone(sp_tokenizer):
    # "Q:▁" ends in a space token that "Q:▁positive" does not have: the prompt's own ids are not the
    # start of the whole's, so the completion is tokenized on its own (the prompt keeps its own ids)
    (head,), (tail,) = encode_pairs(sp_tokenizer, [("Q: ", "positive")])
    assert head == sp_tokenizer("Q: ", add_special_tokens=False)["input_ids"]
    assert tail == sp_tokenizer("positive", add_special_tokens=False)["input_ids"]
    assert encode_pairs(sp_tokenizer, []) == ([], [])


def test_byte_level_and_wordpiece_ids_are_those_tokenized_apart(tiny_chat_llama_dir, tiny_gpt2_dir):
    # WordPiece (the tiny models' MiniLM tokenizer) reads a text's start as its middle: nothing changes
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    pairs = [("user: a film [SEP] assistant:", " positive [SEP]"), ("x\n", "great plot")]
    heads, tails = encode_pairs(tok, pairs)
    apart = tok([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    assert tails == apart and heads == tok([h for h, _ in pairs], add_special_tokens=False)["input_ids"]
