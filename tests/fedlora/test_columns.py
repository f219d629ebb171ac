"""--columns: a data file's columns read under the names of the forms --task sft and dpo read."""

from __future__ import annotations

import json

import pytest

from fedlora.data.columns import parse_columns, renamed
from fedlora.data.instructions import load_instructions
from fedlora.data.preferences import load_preferences
from fedlora.errors import UserError


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_files_own_columns_read_as_a_forms(tmp_path):
    # Prepare: MATH's problem/solution (beside a column named prompt, which is then not the prompt),
    # OpenBookQA's question_stem, and stack-exchange-paired's response_j/response_k
    math = _jsonl(tmp_path / "math.jsonl", [{"problem": "1+1?", "solution": "2", "prompt": "other"}])
    obqa = _jsonl(tmp_path / "obqa.jsonl", [{"question_stem": "Sky?", "choices": ["red", "blue"],
                                             "answer": 1}])
    pairs = _jsonl(tmp_path / "se.jsonl", [{"question": "Why?", "response_j": "Because.",
                                            "response_k": "No."}])
    # Execute
    sft = load_instructions(math, "text", "label", columns=parse_columns("prompt=problem, response=solution"))
    mc = load_instructions(obqa, "text", "label", columns=parse_columns("question=question_stem"))
    dpo = load_preferences(pairs, "text", "label",
                           columns=parse_columns("prompt=question,chosen=response_j,rejected=response_k"))
    # Assert
    assert (sft.texts, sft.responses) == (["1+1?"], ["2"])
    assert (mc.texts, mc.choices, mc.labels, mc.responses) == (["Sky?"], [["red", "blue"]], [1], ["blue"])
    assert (dpo.texts, dpo.responses, dpo.rejected) == (["Why?"], ["Because."], ["No."])


def test_renamed_keeps_other_columns_and_leaves_out_a_shadowed_one():
    rows = [{"q": "a", "prompt": "b", "id": 7}]
    assert renamed(rows, {"prompt": "q"}, "f") == [{"prompt": "a", "id": 7}]
    assert renamed(rows, {}, "f") is rows


@pytest.mark.parametrize("text, message", [
    ("promt=problem", "--columns: 'promt' is not a form's column (prompt, response,"),
    ("prompt=a,prompt=b", "--columns: 'prompt' is given twice"),
    ("prompt", "--columns takes NAME=COLUMN pairs (e.g. prompt=problem,response=solution), got 'prompt'"),
])
def test_bad_columns_are_one_line(text, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_columns(text)


def test_a_mapped_column_the_file_lacks_is_one_line(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "solution": "2"}])
    with pytest.raises(UserError, match=r"^d\.jsonl has no column 'answer' \(--columns\); its columns:"
                                        r" problem, solution$"):
        load_instructions(data, "text", "label", columns={"prompt": "problem", "response": "answer"})


def test_choices_joined_from_several_columns(tmp_path):
    # Prepare: PIQA's form (goal, sol1, sol2, a 0-based label), and a parquet-style A-D with a letter
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text("".join(json.dumps(r) + "\n" for r in [
        {"goal": "open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        {"goal": "dry a towel", "sol1": "soak it", "sol2": "hang it", "label": 1}]))
    mmlu = tmp_path / "mmlu.jsonl"
    row = {"input": "2+2?", "A": "3", "B": "4", "C": "5", "D": "6", "target": "B"}
    mmlu.write_text(json.dumps(row) + "\n")
    # Execute
    ds = load_instructions(piqa, "text", "label",
                           columns=parse_columns("question=goal,choices=sol1+sol2,answer=label"))
    four = load_instructions(mmlu, "text", "label",
                             columns=parse_columns("question=input,choices=A+B+C+D,answer=target"))
    # Assert: the columns in the order named, the answer an index into them (or a letter)
    assert ds.choices == [["twist the lid", "eat the lid"], ["soak it", "hang it"]]
    assert ds.labels == [0, 1] and ds.responses == ["twist the lid", "hang it"]
    assert four.choices == [["3", "4", "5", "6"]] and four.labels == [1]
    with pytest.raises(UserError, match=r"piqa\.jsonl has no column 'sol3' \(--columns\)"):
        load_instructions(piqa, "text", "label", columns=parse_columns("question=goal,choices=sol1+sol3"))
    with pytest.raises(UserError, match="--columns takes NAME=COLUMN pairs"):
        parse_columns("choices=sol1+")


def test_a_joined_choice_column_a_row_lacks_is_one_line(tmp_path):
    # Prepare: a JSONL row without one of the joined columns (the first row has it)
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text("".join(json.dumps(r) + "\n" for r in [
        {"goal": "open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        {"goal": "dry a towel", "sol1": "soak it", "label": 1}]))
    # Execute / Assert: read as a missing choice, as a null one is (it was a KeyError traceback)
    with pytest.raises(UserError, match=r"^piqa\.jsonl row 2: 'choice 2' is null"):
        load_instructions(piqa, "text", "label",
                          columns=parse_columns("question=goal,choices=sol1+sol2,answer=label"))


def test_a_question_joined_from_a_passage_and_its_question(tmp_path):
    # RACE ships article, question, options (a list) and a letter answer: the model must read the article
    race = _jsonl(tmp_path / "race.jsonl", [
        {"article": "Tom has a red bike.", "question": "What colour is the bike?",
         "options": ["blue", "red", "green", "black"], "answer": "B"},
        {"article": "It rained.", "question": "", "options": ["wet", "dry"], "answer": "A"}])
    ds = load_instructions(race, "text", "label",
                           columns=parse_columns("question=article+question,choices=options"))
    # a blank part is left out
    assert ds.texts == ["Tom has a red bike.\n\nWhat colour is the bike?", "It rained."]
    assert ds.labels == [1, 0] and ds.responses == ["red", "wet"]
    # a prompt/response file: the prompt's text joined the same way
    pairs = _jsonl(tmp_path / "qa.jsonl", [{"passage": "Cats nap.", "q": "Do cats nap?", "a": "yes"}])
    got = load_instructions(pairs, "text", "label", columns=parse_columns("prompt=passage+q,response=a"))
    assert got.texts == ["Cats nap.\n\nDo cats nap?"] and got.responses == ["yes"]
    with pytest.raises(UserError, match=r"race\.jsonl has no column 'story' \(--columns\)"):
        load_instructions(race, "text", "label",
                          columns=parse_columns("question=story+question,choices=options"))


def test_an_answer_naming_a_joined_choice_column_is_that_choice(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    # Prepare: COPA as datasets ships it, its label a ClassLabel named after the choice columns
    # (read as names from a folder or Parquet file; before, 'choice2' was refused as no choice)
    features = Features({"premise": Value("string"), "choice1": Value("string"), "choice2": Value("string"),
                         "label": ClassLabel(names=["choice1", "choice2"])})
    Dataset.from_dict({"premise": ["My body cast a shadow.", "The man broke his toe."],
                       "choice1": ["The sun was rising.", "He dropped a hammer."],
                       "choice2": ["The grass was cut.", "He got a hole in his sock."], "label": [0, 1]},
                      features=features).to_parquet(str(tmp_path / "copa.parquet"))
    # Execute
    ds = load_instructions(tmp_path / "copa.parquet", "text", "label",
                           columns=parse_columns("question=premise,choices=choice1+choice2,answer=label"))
    # Assert
    assert ds.labels == [0, 1] and ds.responses == ["The sun was rising.", "He got a hole in his sock."]
