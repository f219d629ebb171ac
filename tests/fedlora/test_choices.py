"""Multiple-choice data (jsonl, MMLU's CSV, label words) and the answer metrics, by hand."""

from __future__ import annotations

import json

import pytest

from fedlora.data.columns import parse_columns
from fedlora.data.instructions import load_instructions
from fedlora.errors import UserError
from fedlora.tasks import ANSWER_METRICS
from fedlora.tasks.answers import answer_metric, balanced_accuracy


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_questions_with_an_index_or_a_letter(tmp_path):
    spec = _jsonl(tmp_path / "mc.jsonl", [
        {"question": "2+2?", "choices": ["3", "4", "five"], "answer": 1},
        {"question": "Sky?", "choices": ["blue", "green"], "answer": "A"},
        {"question": "Odd?", "choices": ["1", "2", "4", "6"], "answer": "0"}])
    ds = load_instructions(spec, "text", "label", "Q: {text}")
    assert ds.texts == ["Q: 2+2?", "Q: Sky?", "Q: Odd?"]                 # the template around the question
    assert ds.choices == [["3", "4", "five"], ["blue", "green"], ["1", "2", "4", "6"]]
    assert ds.labels == [1, 0, 0] and ds.responses == ["4", "blue", "1"]  # what --task sft trains on
    assert ds.label_names == ["A", "B", "C", "D"]


#: One row of each benchmark as its dataset ships it, and (question, choices, answer index) read.
BENCHMARK_ROWS = {
    "arc": ({"id": "x", "question": "Which is a metal?", "answerKey": "2",
             "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]}},
            ("Which is a metal?", ["wood", "iron", "glass"], 1)),
    "commonsenseqa": ({"question": "Where is ice?", "question_concept": "ice", "answerKey": "C",
                       "choices": {"label": ["A", "B", "C"], "text": ["oven", "desert", "freezer"]}},
                      ("Where is ice?", ["oven", "desert", "freezer"], 2)),
    "openbookqa": ({"id": "7", "question_stem": "The sun is a", "answerKey": "A",
                    "choices": {"text": ["star", "planet"], "label": ["A", "B"]}},
                   ("The sun is a", ["star", "planet"], 0)),
    "hellaswag": ({"ctx": "He picks up the ball and", "endings": ["eats it.", "throws it.", "sings."],
                   "label": "1", "activity_label": "Ball"},
                  ("He picks up the ball and", ["eats it.", "throws it.", "sings."], 1)),
    "medqa": ({"question": "Fever drug?", "answer": "Aspirin", "answer_idx": "B",
               "options": {"A": "Insulin", "B": "Aspirin", "C": "Heparin"}},
              ("Fever drug?", ["Insulin", "Aspirin", "Heparin"], 1)),
}


@pytest.mark.parametrize("name", list(BENCHMARK_ROWS))
def test_benchmark_rows_as_they_ship_are_multiple_choice(tmp_path, name):
    row, (question, choices, answer) = BENCHMARK_ROWS[name]
    ds = load_instructions(_jsonl(tmp_path / "b.jsonl", [row]), "text", "label")
    assert (ds.texts, ds.choices, ds.labels, ds.responses) == ([question], [choices], [answer],
                                                               [choices[answer]])


@pytest.mark.parametrize("header", [True, False], ids=["header", "no-header"])
def test_mmlu_csv_with_or_without_its_header(tmp_path, header):
    path = tmp_path / "mmlu.csv"
    lines = ['"What is 2, plus 2?",3,4,5,6,B', "Largest planet?,Mars,Venus,Jupiter,Earth,C"]
    path.write_text("\n".join((["question,A,B,C,D,answer"] if header else []) + lines) + "\n")
    ds = load_instructions(str(path), "text", "label")
    assert ds.texts == ["What is 2, plus 2?", "Largest planet?"]
    assert ds.choices == [["3", "4", "5", "6"], ["Mars", "Venus", "Jupiter", "Earth"]]
    assert ds.labels == [1, 2] and ds.responses == ["4", "Jupiter"]


def test_an_mmlu_csvs_numbers_are_indices_unless_a_choice_of_that_text_says_otherwise(tmp_path):
    # Prepare: index answers; rows of numeric choices whose answer is no choice's text, or the choice at
    # its own index; and one where the index and the choice of that text differ
    path, bad = tmp_path / "mmlu.csv", tmp_path / "bad.csv"
    head = "question,A,B,C,D,answer\n"
    path.write_text(head + "Capital of France?,Rome,Paris,Oslo,Bern,1\nWhat is 0+3?,0,1,2,5,3\n"
                    "What is 2-1?,0,1,2,3,1\n")
    bad.write_text(head + "What is 1+1?,1,2,3,4,1\n")   # index 1 ('2') or the choice '1' (index 0)?
    # Execute
    ds = load_instructions(str(path), "text", "label")
    # Assert: one reading per file (it read each row its own way); the ambiguous row refused in one line
    assert ds.labels == [1, 3, 1] and ds.responses == ["Paris", "5", "1"]
    with pytest.raises(UserError, match=r"^bad\.csv line 2: answer '1' could be index 1 or the choice '1'"
                                        r" \(index 0\), and a CSV cell cannot say which: give the answer as a"
                                        r" letter \(A-D\)$"):
        load_instructions(str(bad), "text", "label")


def test_label_words_become_the_choices(tmp_path):
    tsv = tmp_path / "sst.tsv"
    tsv.write_text("label\tsentence\n1\tgood film\n0\tdull plot\n")
    ds = load_instructions(str(tsv), "sentence", "label", "Review: {text}", "0=negative,1=positive")
    assert ds.choices == [["negative", "positive"]] * 2 and ds.labels == [1, 0]
    assert ds.subset([1]).choices == [["negative", "positive"]]      # a split keeps them
    pairs = load_instructions(_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "response": "hello"}]),
                              "text", "label")
    assert pairs.choices is None                                     # free-form responses have none


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "choices": "a or b", "answer": 0}, "row 1: 'choices' must be a list of 2 to 26"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "row 1: 'choices' must be a list of 2 to 26"),
    ({"question": "q", "choices": ["a", ""], "answer": 0}, "row 1: choice 2 is empty"),
    ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4},
     "row 1: answer 4 is not among its 4 choices; give the right choice's index (0-3) or letter (A-D)"),
    ({"question": "q", "choices": ["a", "b"], "answer": "E"}, "row 1: answer 'E' is not among its 2 choices"),
], ids=["not-a-list", "one-choice", "empty-choice", "index-outside", "letter-outside"])
def test_bad_multiple_choice_rows_are_refused(tmp_path, row, message):
    with pytest.raises(UserError, match="mc.jsonl " + message.replace("(", r"\(").replace(")", r"\)")):
        load_instructions(_jsonl(tmp_path / "mc.jsonl", [row]), "text", "label")


def test_bad_mmlu_lines_are_refused(tmp_path):
    path = tmp_path / "mmlu.csv"
    path.write_text("q1,a,b,c,d,A\nq2,a,b,c,E\n")
    with pytest.raises(UserError, match="mmlu.csv line 2 has 5 fields, not 6"):
        load_instructions(str(path), "text", "label")
    path.write_text("q1,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(UserError, match="mmlu.csv line 2: answer 'E' is not among its 4 choices"):
        load_instructions(str(path), "text", "label")


def test_rouge_l_f1_by_hand():
    # Lin (2004)'s example: LCS("police killed the gunman", "police kill the gunman") = police the gunman
    rouge = ANSWER_METRICS["rouge-l"]
    assert rouge.score("police kill the gunman", "police killed the gunman") == pytest.approx(3 / 4)
    # LCS = "the gunman": P = R = 2/4
    assert rouge.score("the gunman kill police", "police killed the gunman") == pytest.approx(1 / 2)
    # unequal lengths: LCS = the cat sat (3); P = 3/6, R = 3/3, F = 2·(1/2)·1 / (3/2) = 2/3
    assert rouge.score("The big cat sat down today.", "the cat sat") == pytest.approx(2 / 3)
    assert rouge.score("dog", "the cat sat") == 0.0
    assert rouge.mean(["police kill the gunman", "dog"], ["police killed the gunman", "cat"]) == \
        pytest.approx(3 / 8)


def test_balanced_accuracy_averages_the_classes_recalls():
    # "a": 2 of 2 right; "b": 1 of 3 right ("B." normalizes to "b"); "c": 0 of 1 -> (1 + 1/3 + 0) / 3
    answers = ["a", "a", "B.", "a", "a", "b"]
    references = ["a", "a", "b", "b", "b", "c"]
    assert balanced_accuracy(answers, references) == pytest.approx(4 / 9)
    assert balanced_accuracy([], []) == 0.0


def test_exact_and_contains_compare_normalized_answers():
    exact, contains = ANSWER_METRICS["exact"], ANSWER_METRICS["contains"]
    assert exact.score(" Positive.\n", "positive") == 1.0 and exact.score("very positive", "positive") == 0.0
    assert contains.score("The review is  POSITIVE!", "positive") == 1.0
    assert contains.score("negative", "positive") == 0.0
    # whole words: a yes/no/maybe answer is not found inside another word (it was a substring match)
    cases = (("I do not know.", "no"), ("Yesterday", "yes"), ("14", "4"), ("No, it is not.", "no"),
             ("maybe (B)", "b"))
    assert [contains.score(a, r) for a, r in cases] == [0, 0, 0, 1, 1]
    assert contains.score("答案是东京", "东京") == contains.score("東京です", "東京") == 1.0  # no spaces
    assert exact.score("**Positive**", "positive") == exact.score("(B)", "B") == 1.0
    assert (exact.column, contains.column, ANSWER_METRICS["rouge-l"].column) == \
        ("answer_accuracy", "answer_contains", "rouge_l")
    # the default: exact for closed-set answers, ROUGE-L for free-form ones
    assert answer_metric("auto", True).name == "exact" and answer_metric("auto", False).name == "rouge-l"
    assert answer_metric("contains", True).name == "contains"


def test_exact_strips_typographic_quotes_and_full_width_punctuation_as_it_strips_ascii_ones():
    exact, contains = ANSWER_METRICS["exact"], ANSWER_METRICS["contains"]
    # a chat model's curly quotes, guillemets, CJK brackets and full stop (they scored 0; '"yes"' scored 1)
    answers = ["“positive”", "‘B’", "« oui »", "「東京」", "A。", "（B）",
               "positive…"]
    references = ["positive", "B", "oui", "東京", "A", "b", "Positive"]
    assert [exact.score(a, r) for a, r in zip(answers, references, strict=True)] == [1.0] * 7
    assert contains.score("it is positive", "“positive”") == 1.0
    assert exact.score("“very” positive", "very positive") == 0.0     # inside: kept


def test_number_compares_the_final_numbers_as_gsm8k_marks_them():
    number = ANSWER_METRICS["number"]
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"
    cases = [("72", 1.0), ("So the answer is 72.", 1.0), ("48 + 24 = 72 #### 72", 1.0), ("#### 72.0", 1.0),
             ("She sold $72 in all", 1.0), ("24 clips, then 48", 0.0), ("seventy-two", 0.0),
             ("#### 71 (I think 72)", 0.0)]   # after ####: its first number, not the last
    assert [number.score(a, gsm8k) for a, _ in cases] == [s for _, s in cases]
    assert number.score("1,080 apples", "#### 1080") == number.score("-3", "it fell by -3") == 1.0
    assert number.score("no idea", "no number either") == 0.0 and number.column == "answer_number"


def test_number_reads_commas_as_thousands_only_and_a_sign_only_before_a_number():
    number = ANSWER_METRICS["number"]
    # "1,2,3" is a list (its last number 3, not 123); a date's "-05" is the day 5, not minus 5
    assert number.score("1,2,3", "3") == number.score("on 2026-12-05", "5") == 1.0
    assert number.score("1,2,3", "123") == number.score("on 2026-12-05", "-5") == 0.0
    assert number.score("$1,000.50 in all", "#### 1000.5") == number.score("(-4)", "-4") == 1.0


def test_number_reads_a_decimal_without_its_leading_zero_and_the_unicode_minus_sign():
    number = ANSWER_METRICS["number"]
    # ".5" is a half and "$.75" 75 cents (they were read as 5 and 75); "−3" (U+2212) is minus 3, not 3
    assert number.score("It is .5", "0.5") == number.score("$.75", "#### 0.75") == 1.0
    assert number.score("It is .5", "5") == number.score("$.75", "75") == 0.0
    assert number.score("a fall of −3", "-3") == number.score("-.25 in all", "#### -0.25") == 1.0
    assert number.score("a fall of −3", "3") == 0.0
    assert number.score("v1.2.3", "3") == number.score("2026-12-05", "5") == 1.0   # as before


def test_an_answer_that_is_a_numeric_choices_text_names_that_choice(tmp_path):
    # choices that are numbers: "2" as text is the choice "2" (index 1), 2 as a JSON number index 2
    rows = [{"question": "q", "choices": ["1", "2", "3", "4"], "answer": "2"},
            {"question": "q", "choices": ["1", "2", "3", "4"], "answer": "4"},
            {"question": "q", "choices": ["1", "2", "3", "4"], "answer": 2},
            {"question": "q", "choices": ["red", "blue"], "answer": "1"}]           # not numbers: an index
    ds = load_instructions(_jsonl(tmp_path / "n.jsonl", rows), "text", "label")
    assert ds.labels == [1, 3, 2, 1] and ds.responses == ["2", "4", "3", "blue"]


def test_an_answer_given_as_a_choices_text_or_an_integral_float(tmp_path):
    # Prepare: the right choice's own text; 3.0 as pandas writes a nullable integer; "B" a letter even
    # where a choice's text is "B" (the letter first, as before)
    rows = [{"question": "q", "choices": ["option alpha", "option delta", "c"], "answer": "option delta"},
            {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 3.0},
            {"question": "q", "choices": ["B", "A"], "answer": "B"},
            {"question": "q", "choices": ["3", "many"], "answer": "3"}]     # not an index: the text
    # Execute
    ds = load_instructions(_jsonl(tmp_path / "t.jsonl", rows), "text", "label")
    # Assert
    assert ds.labels == [1, 3, 1, 0] and ds.responses == ["option delta", "d", "A", "3"]
    with pytest.raises(UserError, match=r"row 1: answer 2\.5 is not among its 4 choices"):
        load_instructions(_jsonl(tmp_path / "f.jsonl", [{**rows[1], "answer": 2.5}]), "text", "label")


def test_one_based_answers_are_read_as_one_based_and_said_once(tmp_path, capsys):
    # SocialIQA (context, question, answerA-C, label "1"-"3") and Winogrande (option1/option2, answer
    # "1"/"2") count from 1; they were refused, and read shifted they were every answer off by one
    siqa = [{"context": "Tom was cold.", "question": "What did Tom do?", "answerA": "swim",
             "answerB": "sleep",
             "answerC": "wear a coat", "label": k} for k in ("3", "1", "2")]
    ds = load_instructions(_jsonl(tmp_path / "siqa.jsonl", siqa), "text", "label", columns=parse_columns(
        "question=context+question,choices=answerA+answerB+answerC,answer=label"))
    assert ds.labels == [2, 0, 1] and ds.responses == ["wear a coat", "swim", "sleep"]
    assert ds.texts[0] == "Tom was cold.\n\nWhat did Tom do?"
    assert capsys.readouterr().err.count("siqa.jsonl: its answers count from 1") == 1
    wino = [{"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
             "option2": "the table", "answer": "2"}, {**{"sentence": "x _", "option1": "a", "option2": "b"},
                                                       "answer": "1"}]
    ds = load_instructions(_jsonl(tmp_path / "wino.jsonl", wino), "text", "label", columns=parse_columns(
        "question=sentence,choices=option1+option2"))
    assert ds.labels == [1, 0]


def test_answers_that_are_not_one_based_either_are_refused(tmp_path):
    rows = [{"question": "q", "choices": ["a", "b", "c"], "answer": k} for k in (1, 3, 0)]  # a 0: not 1-based
    with pytest.raises(UserError, match=r"answer 3 is not among its 3 choices; give the right choice's index"
                                        r" \(0-2\) or letter \(A-C\)$"):
        load_instructions(_jsonl(tmp_path / "o.jsonl", rows), "text", "label")
    rows = [{"question": "q", "choices": ["a", "b", "c"], "answer": k} for k in ("B", 3)]     # a letter
    with pytest.raises(UserError, match=r"answer 3 is not among its 3 choices"):
        load_instructions(_jsonl(tmp_path / "l.jsonl", rows), "text", "label")


@pytest.mark.parametrize("row, message", [
    ({"question": None, "choices": ["a", "b"], "answer": 0}, "row 1: 'question' is null"),
    ({"question": "q", "choices": ["a", None], "answer": 0}, "row 1: 'choice 2' is null"),
    ({"question": "q", "choices": ["a", ["b"]], "answer": 0}, r"row 1: 'choice 2' is a list \(\"\['b'\]\"\)"),
], ids=["null-question", "null-choice", "list-choice"])
def test_null_and_list_cells_of_a_multiple_choice_row_are_refused(tmp_path, row, message):
    with pytest.raises(UserError, match=message):
        load_instructions(_jsonl(tmp_path / "mc.jsonl", [row]), "text", "label")
