"""Instruction data for --task sft: every accepted form, label words, and one-line refusals."""

from __future__ import annotations

import json

import pytest

from fedlora.data.instructions import BBC_LEAD_WORDS, BBC_TEMPLATE, load_instructions, parse_label_words
from fedlora.data.loading import load_bbcnews
from fedlora.errors import UserError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_response_alpaca_and_chat_rows(tmp_path):
    # Prepare: one file per form
    pairs = _jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "response": "4"}])
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2 and 2", "output": "4"},
                                            {"instruction": "Say hi.", "input": "", "output": "hi"}])
    chat = _jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]}])
    # Execute
    a, b, c = (load_instructions(f, "text", "label") for f in (pairs, alpaca, chat))
    # Assert: prompts and responses as written; the chat keeps its earlier turns as the prompt
    assert a.texts == ["2+2?"] and a.responses == ["4"] and a.labels is None
    assert b.texts == ["Add.\n\n2 and 2", "Say hi."] and b.responses == ["4", "hi"]
    assert c.texts == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]]
    assert c.responses == ["4"]


def test_labeled_file_becomes_questions_with_label_words(tmp_path):
    tsv = tmp_path / "sst.tsv"
    tsv.write_text("label\tsentence\n1\tgood film\n0\tdull plot\n1\tfine\n")
    ds = load_instructions(str(tsv), "sentence", "label", "Review: {text}\nSentiment?",
                           "0=negative,1=positive")
    assert ds.texts == ["Review: good film\nSentiment?", "Review: dull plot\nSentiment?",
                        "Review: fine\nSentiment?"]
    assert ds.responses == ["positive", "negative", "positive"]
    assert ds.labels == [1, 0, 1]  # kept for a Dirichlet partition
    # without words the label itself is the answer; without a template the text is the prompt
    bare = load_instructions(str(tsv), "sentence", "label")
    assert bare.texts[0] == "good film" and bare.responses == ["1", "0", "1"]


def test_bbcnews_instruct_asks_for_the_category():
    ds = load_instructions("bbcnews-instruct", "text", "label")
    assert len(ds) == 2225
    assert sorted(set(ds.responses)) == ["business", "entertainment", "politics", "sports", "tech"]
    head, tail = BBC_TEMPLATE.split("{text}")
    assert ds.texts[0].startswith(head) and ds.texts[0].endswith(tail)
    assert ds.responses[0] == ds.label_names[ds.labels[0]]
    # each prompt holds the article's lead: its first 64 words, " …" where the article goes on
    article = load_bbcnews().texts[0].split()
    assert ds.texts[0] == BBC_TEMPLATE.replace("{text}", " ".join(article[:BBC_LEAD_WORDS]) + " …")
    assert BBC_LEAD_WORDS == 64 < len(article)


def test_label_words_parse_and_refusals(tmp_path):
    assert parse_label_words("0=negative, 1 = positive") == {"0": "negative", "1": "positive"}
    tsv = tmp_path / "d.tsv"
    tsv.write_text("label\tsentence\n0\ta\n2\tb\n")
    with pytest.raises(UserError, match=r"no word for label\(s\) '2'"):
        load_instructions(str(tsv), "sentence", "label", label_words="0=no,1=yes")
    with pytest.raises(UserError, match=r"needs a \{text\} slot"):
        load_instructions(str(tsv), "sentence", "label", template="Classify this.")
    with pytest.raises(UserError, match="LABEL=WORD"):
        parse_label_words("negative,positive")


#: One row in each form the common instruction sets ship, and the prompt and response it gives.
FORMS = {
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."},
                                    {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], "Hello."),
    "trl-text": ({"prompt": "2+2=", "completion": "4"}, "2+2=", "4"),
    "trl-chat": ({"prompt": [{"role": "user", "content": "2+2?"}],
                  "completion": [{"role": "assistant", "content": "4"}]},
                 [{"role": "user", "content": "2+2?"}], "4"),
    "dolly": ({"instruction": "Sum up.", "context": "A long text.", "response": "Short.", "category": "x"},
              "Sum up.\n\nA long text.", "Short."),
    "dolly-no-context": ({"instruction": "Name a colour.", "context": "", "response": "Red."},
                         "Name a colour.", "Red."),
    "gsm8k": ({"question": "What is 3 times 4?", "answer": "3 * 4 = 12\n#### 12"},
              "What is 3 times 4?", "3 * 4 = 12\n#### 12"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_the_common_instruction_forms_give_prompt_and_response(tmp_path, form):
    row, prompt, response = FORMS[form]
    ds = load_instructions(_jsonl(tmp_path / "d.jsonl", [row, row]), "text", "label")
    assert ds.texts == [prompt, prompt] and ds.responses == [response, response]
    assert ds.labels is None and ds.choices is None


def test_unrecognized_columns_and_bad_messages_are_one_line(tmp_path):
    odd = _jsonl(tmp_path / "odd.jsonl", [{"query": "x", "reply": "y"}])
    with pytest.raises(UserError, match=r"odd.jsonl has no prompt/response columns \(columns: query,"
                                        r" reply\): --task sft reads messages or conversations,"
                                        r" prompt/response, prompt/completion, instruction/output,"
                                        r" instruction/response, question/answer, question/choices/answer"):
        load_instructions(odd, "text", "label")
    sharegpt = _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "a"},
                                                                {"from": "bot", "value": "b"}]}])
    with pytest.raises(UserError, match=r"s.jsonl row 1: every message must be \{role, content\} \(or"
                                        r" ShareGPT's \{from, value\}, from one of human, user, gpt"):
        load_instructions(sharegpt, "text", "label")
    last_user = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "user", "content": "b"}]}])
    with pytest.raises(UserError, match="last message must be the assistant's"):
        load_instructions(last_user, "text", "label")
    with pytest.raises(UserError, match="not found"):
        load_instructions(str(tmp_path / "missing.jsonl"), "text", "label")
