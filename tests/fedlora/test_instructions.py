"""Instruction data for --task sft: every accepted form, label words, and one-line refusals."""

from __future__ import annotations

import json

import pytest

from fedlora.data.instructions import BBC_LEAD_WORDS, BBC_TEMPLATE, load_instructions, parse_label_words
from fedlora.data.loading import load_bbcnews
from fedlora.errors import SAID, UserError


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
    with pytest.raises(UserError, match=r"--label-words gives label '0' twice \('0=a,1=b,0=c'\): keep one"):
        parse_label_words("0=a,1=b,0=c")  # the last one was taken


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


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "response": None}, "rows.jsonl row 2: 'response' is null"),
    ({"prompt": "q", "response": {"text": "a"}}, "rows.jsonl row 2: 'response' is a dict"),
    ({"prompt": ["q"], "response": "a"}, "rows.jsonl row 2: every message must be"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "rows.jsonl row 2: 'content' is null"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]},
     r"rows.jsonl row 2: a message's content parts must be text .* got 'image_url' parts"),
], ids=["null", "dict", "list-prompt", "null-content", "image-part"])
def test_null_list_and_dict_cells_are_refused_with_their_row(tmp_path, row, message):
    # Prepare: a good first row of the same form, then the bad one (row 2)
    good = ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
            if "messages" in row else {"prompt": "q", "response": "a"})
    path = _jsonl(tmp_path / "rows.jsonl", [good, row])
    # Execute / Assert: a one-line refusal naming row 2 (not the Python text "None" trained on)
    with pytest.raises(UserError, match=message):
        load_instructions(path, "text", "label")


def test_openai_text_parts_are_their_texts_joined(tmp_path):
    parts = [{"type": "text", "text": "Read this."}, {"type": "text", "text": "Then answer."}]
    path = _jsonl(tmp_path / "parts.jsonl", [{"messages": [{"role": "user", "content": parts},
                                                           {"role": "assistant", "content": "ok"}]}])
    ds = load_instructions(path, "text", "label")
    assert ds.texts == [[{"role": "user", "content": "Read this.\nThen answer."}]] and ds.responses == ["ok"]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "q", "response": "a"}, {"prompt": "q2"}],
     r"m.jsonl row 2 has no 'response' column, which the first row's form \(prompt/response\) needs"),
    ([{"prompt": "q", "response": "a"},
      {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
     r"m.jsonl row 2 has no 'prompt' column.* \(this one has: messages\)"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
      {"prompt": "q", "response": "a"}], "m.jsonl row 2 has no 'messages' column"),
], ids=["missing-response", "messages-after-pairs", "pairs-after-messages"])
def test_a_row_missing_the_first_rows_column_is_one_line(tmp_path, rows, message):
    with pytest.raises(UserError, match=message):
        load_instructions(_jsonl(tmp_path / "m.jsonl", rows), "text", "label")


def test_empty_responses_are_skipped_with_one_warning_or_refused(tmp_path, capsys):
    SAID.clear()
    rows = [{"prompt": "q1", "response": "a"}, {"prompt": "q2", "response": " "},
            {"prompt": "q3", "response": ""}]
    path = _jsonl(tmp_path / "e.jsonl", rows)
    ds = load_instructions(path, "text", "label")
    load_instructions(path, "text", "label")                                 # read twice, said once
    assert ds.texts == ["q1"] and ds.responses == ["a"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedlora: 2 of 3 rows of e.jsonl have an empty response; they were skipped"]
    with pytest.raises(UserError, match=r"e2.jsonl: every response is empty \(all 2 rows\)"):
        load_instructions(_jsonl(tmp_path / "e2.jsonl", rows[1:]), "text", "label")


def test_label_words_are_every_choice_whatever_labels_a_file_holds(tmp_path):
    # Prepare: a held-out file of label 1 only; the label words name labels 0, 1 and 2
    csv = tmp_path / "pos.csv"
    csv.write_text("text,label\ngood,1\nfine,1\n")
    ds = load_instructions(str(csv), "text", "label", "S? {text}", "0=negative,1=positive,2=neutral")
    # Assert: three choices (labels in order 0, 1, 2), the answer's index among them is 1
    assert ds.choices == [["negative", "positive", "neutral"]] * 2 and ds.labels == [1, 1]
    assert ds.label_names == ["0", "1", "2"] and ds.responses == ["positive", "positive"]
    # without label words, the training data's labels (known) join the file's own
    ds = load_instructions(str(csv), "text", "label", "S? {text}", known=lambda: ["0", "1"])
    assert ds.choices == [["0", "1"]] * 2 and ds.labels == [1, 1]


@pytest.mark.parametrize("rows, flags, message", [
    ([{"instruction": "i", "input": "", "output": "o"}], {"template": "Q: {text}"},
     r"a.jsonl holds prompts and responses \(instruction/output\), which are read as they are:"
     r" --prompt-template is for a labeled file .*; drop --prompt-template$"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
     {"template": "Q: {text}", "label_words": "0=no"},
     r"\(messages\).* --prompt-template and --label-words are for a labeled file"),
], ids=["alpaca", "messages"])
def test_template_on_instruction_data_says_to_drop_it(tmp_path, rows, flags, message):
    # the old hint was "pass --text-column instruction", which reads the instruction as a text to label
    with pytest.raises(UserError, match=message):
        load_instructions(_jsonl(tmp_path / "a.jsonl", rows), "text", "label", **flags)


def test_a_string_that_looks_like_json_is_text_and_a_csv_chat_is_messages(tmp_path):
    # Prepare: structured answers (a JSON array of objects, as text) in JSON lines, which stay text;
    # messages a file stored as a JSON string (role/content objects); TRL's conversational
    # prompt/completion in a CSV, whose cells are all text
    structured = _jsonl(tmp_path / "s.jsonl", [
        {"prompt": "Entities in 'Alice met Bob'?", "response": '[{"entity": "Alice0"}]'},
        {"prompt": '[{"id": 1}] Which id?', "response": "1"},
        {"prompt": "Echo", "response": '[{"role": "assistant", "content": "x"}]'}])   # messages, as a string
    csv = tmp_path / "c.csv"
    csv.write_text('prompt,completion\n"[{""role"": ""user"", ""content"": ""2+2?""}]",'
                   '"[{""role"": ""assistant"", ""content"": ""4""}]"\n'
                   'Entities?,"[{""entity"": ""Alice0""}]"\n')
    # Execute
    s, c = load_instructions(structured, "text", "label"), load_instructions(str(csv), "text", "label")
    # Assert
    assert s.texts == ["Entities in 'Alice met Bob'?", '[{"id": 1}] Which id?', "Echo"]
    assert s.responses == ['[{"entity": "Alice0"}]', "1", "x"]
    assert c.texts == [[{"role": "user", "content": "2+2?"}], "Entities?"]
    assert c.responses == ["4", '[{"entity": "Alice0"}]']


@pytest.mark.parametrize("row, column, advice", [
    # MMLU saved by pandas to CSV (choices a string: the answer's index was the response), MMLU-Pro
    ("question,subject,choices,answer\nWhat is 0+0?,math,['1' '0' '2' '3'],1\n", "choices", "choice"),
    ({"question": "q", "options": ["a", "b"], "answer": "A", "answer_index": 0}, "options", "choice"),
    # BoolQ: the passage would be dropped, the bare question the prompt
    ({"question": "is it?", "answer": True, "passage": "It is."}, "passage", "join it to the prompt"),
    ({"prompt": "hi", "response": "hello", "system": "Be brief."}, "system", "join it to the prompt"),
])
def test_a_column_a_pair_form_would_drop_is_refused(tmp_path, row, column, advice):
    # Prepare
    data = tmp_path / ("d.csv" if isinstance(row, str) else "d.jsonl")
    data.write_text(row) if isinstance(row, str) else _jsonl(data, [row] * 3)
    # Execute / Assert: one line naming the column (these rows trained without it, silently)
    with pytest.raises(UserError, match=f"^{data.name}: its .* rows also have a '{column}' column, which"
                                        f" that form does not read \\(it would be dropped\\): .*{advice}"):
        load_instructions(str(data), "text", "label")


def test_a_pair_of_text_columns_is_a_labeled_file_without_label_words(tmp_path):
    # --text-column s1+s2 names two columns: the file is labeled data (its labels the answers), for
    # --task sft and dpo alike, as one text column is; not refused as having no prompt/response columns
    from fedlora.data.preferences import load_preferences

    path = _jsonl(tmp_path / "rte.jsonl", [{"s1": "Cats sleep.", "s2": "Cats rest.", "label": "yes"},
                                           {"s1": "Fish swim.", "s2": "Fish fly.", "label": "no"}])
    ds = load_instructions(str(path), "s1+s2", "label")
    assert ds.texts == ["Cats sleep.\n\nCats rest.", "Fish swim.\n\nFish fly."]
    assert ds.responses == ["yes", "no"]
    pairs = load_preferences(str(path), "s1+s2", "label")
    assert pairs.texts == ds.texts and pairs.rejected == ["no", "yes"]
