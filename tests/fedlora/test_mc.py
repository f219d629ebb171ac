"""--eval mc: choices scored from one prefill equal a direct computation; acc and acc_norm by hand."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.data.loading import TextDataset
from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.models.state import apply_global
from fedlora.strategies import GlobalState
from fedlora.tasks import choice as choice_module
from fedlora.tasks import get_task
from fedlora.tasks.decode import score_choices


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_chat_llama_dir)


@pytest.fixture(scope="module")
def fm(tiny_chat_llama_dir):
    """The tiny chat LLaMA with random (nonzero) adapters on every linear layer."""
    config = AdapterConfig(ranks=[4], alpha=8.0, target_modules=["all-linear"], train_head=False)
    model = FederatedModel(AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir), config)
    g = torch.Generator().manual_seed(3)
    factors = {n: (torch.randn(4, m.lora_A.shape[2], generator=g),
                   torch.randn(m.lora_B.shape[1], 4, generator=g)) for n, m in model.adapters.items()}
    apply_global(model, GlobalState(factors=factors, scale=2.0), {})
    return model


def _mc(**kw) -> JobConfig:
    return JobConfig(task="sft", model="unused", **{"eval": "mc", "max_length": 64, **kw})


@torch.no_grad()
def _direct(fm, prompt: list[int], choice: list[int]) -> float:
    """log p(choice | prompt) from one forward pass over the whole row, token by token."""
    logp = torch.log_softmax(fm(input_ids=torch.tensor([prompt + choice])).logits[0].float(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + t, c]) for t, c in enumerate(choice))


def test_choices_from_one_prefill_equal_each_choice_scored_alone(fm, chat_tok, tmp_path):
    # Prepare: questions of different lengths with 2-4 choices of 1 to 5 tokens
    rows = [{"question": "a rather long question about the plot of a film", "choices":
             ["yes", "no way at all", "maybe so"], "answer": 2},
            {"question": "short", "choices": ["great film", "dull"], "answer": "A"},
            {"question": "which word", "choices": ["one", "two words", "three words here", "four"],
             "answer": 3}]
    spec = tmp_path / "mc.jsonl"
    spec.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, cfg = get_task("sft"), _mc(prompt_template="Q: {text}", eval_batch_size=2)
    data = task.eval_set(chat_tok, task.load(str(spec), cfg), cfg)
    assert len({len(c) for row in data.choices for c in row}) > 2       # choices of unequal token length
    # the prompt as --task sft renders it (chat template, template), the choice alone after it
    short = data.prompts[0]
    assert short == chat_tok("user: Q: short [SEP] assistant:", add_special_tokens=False)["input_ids"]
    assert data.choices[0][0] == chat_tok("great film", add_special_tokens=False)["input_ids"]
    # Execute: one batch of every row (left-padded prompts, choices from the prompts' cache)
    got = score_choices(fm, data.prompts, data.choices, chat_tok.pad_token_id)
    # Assert: each equals the choice scored alone after its prompt
    want = [[_direct(fm, p, c) for c in row] for p, row in zip(data.prompts, data.choices, strict=True)]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-5, abs=1e-5)
    # and evaluate (batches of 2) reports what the direct scores give
    metrics = task.evaluate(fm, data, cfg)

    def best(values):
        return max(range(len(values)), key=values.__getitem__)

    answers = data.answers
    assert metrics["mc_accuracy"] == sum(best(w) == a for w, a in zip(want, answers, strict=True)) / 3
    normed = [[x / b for x, b in zip(w, size, strict=True)] for w, size in zip(want, data.sizes, strict=True)]
    assert metrics["mc_accuracy_norm"] == sum(best(w) == a for w, a in zip(normed, answers, strict=True)) / 3
    assert metrics["accuracy"] == metrics["mc_accuracy"] and metrics["eval_examples"] == 3
    nll = -sum(w[a] for w, a in zip(want, answers, strict=True))
    tokens = sum(len(row[a]) for row, a in zip(data.choices, answers, strict=True))
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert task.headline(data) == "mc_accuracy"


def test_accuracy_and_length_normalised_accuracy_by_hand(chat_tok, monkeypatch):
    # Prepare: three questions whose choice scores are given; sizes are characters, as lm-eval's
    # len(choice) ("éé" is 2, not its 4 UTF-8 bytes)
    ds = TextDataset(["q0", "q11", "q222"], [1, 0, 1], ["A", "B"], None,
                     [["a", "bbbb"], ["xx", "y"], ["éé", "abc"]])
    scores = {"q0": [-2.0, -4.0],        # acc: a (wrong);  norm: -2/1 < -4/4, bbbb (right)
              "q11": [-1.0, -1.0],       # a tie: the first (right); norm: -1/2 > -1/1 (right)
              "q222": [-4.0, -4.0]}      # tie: éé (wrong); norm: -4/2 < -4/3, abc (right; per byte: wrong)
    task, cfg = get_task("sft"), _mc(eval_batch_size=8)
    data = task.eval_set(chat_tok, ds, cfg)

    def fake(fm, prompts, choices, pad):
        return [scores[next(q for q in scores if q in chat_tok.decode(p).split())] for p in prompts]

    monkeypatch.setattr(choice_module, "score_choices", fake)
    # Execute
    got = task.evaluate(None, data, cfg)
    # Assert: acc 1/3, acc_norm 3/3; loss: the right choices' nll over their tokens
    assert got["mc_accuracy"] == pytest.approx(1 / 3) and got["mc_accuracy_norm"] == 1.0
    tokens = [len(chat_tok(c, add_special_tokens=False)["input_ids"]) for c in ("bbbb", "xx", "abc")]
    assert got["loss"] == pytest.approx((4.0 + 1.0 + 4.0) / sum(tokens))


def test_a_choice_given_twice_is_right_whichever_copy_scores_best(chat_tok, monkeypatch):
    # Prepare: a row listing "yes" twice whose answer is the second copy (index 2); the first copy
    # scores best (a tie broken by index); a row of distinct choices where the model is wrong
    ds = TextDataset(["q0", "q11"], [2, 0], ["A", "B", "C"], None,
                     [["yes", "no", "yes"], ["up", "down", "in"]])
    scores = {"q0": [-1.0, -3.0, -1.0], "q11": [-2.0, -1.0, -3.0]}
    task, cfg = get_task("sft"), _mc(eval_batch_size=8)
    data = task.eval_set(chat_tok, ds, cfg)
    monkeypatch.setattr(choice_module, "score_choices", lambda fm, prompts, choices, pad: [
        scores[next(q for q in scores if q in chat_tok.decode(p).split())] for p in prompts])
    # Execute
    got = task.evaluate(None, data, cfg)
    # Assert: the first row is right by its text (it was wrong by index), the second wrong
    assert got["mc_accuracy"] == got["mc_accuracy_norm"] == 0.5


def test_mc_refusals_and_long_prompts(chat_tok, capsys):
    task = get_task("sft")
    free = TextDataset(["hi"], None, [], ["hello"])
    with pytest.raises(UserError, match="--eval mc needs choices for every held-out example"):
        task.eval_set(chat_tok, free, _mc())
    ds = TextDataset([" ".join(["word"] * 40), "short"], [0, 1], ["A", "B"], None, [["yes", "no"]] * 2)
    data = task.eval_set(chat_tok, ds, _mc(max_length=16))
    assert max(len(p) for p in data.prompts) == 15             # 16 minus the longest choice's one token
    assert "1 of 2 multiple-choice prompts exceed --max-length 16" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"every held-out example \(1, the held-out split of --data\) has a"
                       r" choice of --max-length 2 tokens or more alone \(the longest has 3 tokens\)"):
        task.eval_set(chat_tok, TextDataset(["q"], [0], ["A"], None, [["a b c", "d"]]), _mc(max_length=2))


def test_a_choice_as_long_as_max_length_leaves_its_prompt_a_token_or_is_not_scored(chat_tok, fm, capsys):
    # Prepare: "a b c d" is 4 tokens, all of --max-length 4: its prompts would be cut to no token (a
    # batch of such prompts was a traceback: an empty tensor of floats to the embedding)
    task = get_task("sft")
    ds = TextDataset(["q one", "q two", "q three"], [0, 1, 1], ["A", "B"], None,
                     [["a b c d", "no"], ["a b c d", "no"], ["yes", "no"]])
    cfg = _mc(max_length=4)
    # Execute
    data = task.eval_set(chat_tok, ds, cfg)
    got = task.evaluate(fm, data, cfg)
    # Assert: the third row alone is scored, its prompt cut to 4 - 1 tokens
    assert got["eval_examples"] == 1 and [len(p) for p in data.prompts] == [3]
    assert ("2 of 3 held-out examples (the held-out split of --data) have a choice of --max-length 4"
            " tokens or more alone") in capsys.readouterr().err


def test_a_sliding_window_model_scores_choices_and_references_past_its_window(chat_tok):
    # Prepare: a tiny Mistral attending to its last 4 positions, with random adapters; prompts of 2-10
    # tokens and choices of 1-6, so a continuation crosses the window (its cache keeps only the window)
    from transformers import MistralConfig, MistralForCausalLM

    from fedlora.tasks.decode import score_and_generate

    torch.manual_seed(0)
    shape = {"vocab_size": chat_tok.vocab_size, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64,
             "pad_token_id": chat_tok.pad_token_id}
    fm = FederatedModel(MistralForCausalLM(MistralConfig(sliding_window=4, **shape)),
                        AdapterConfig(ranks=[2], train_head=False))
    g = torch.Generator().manual_seed(1)
    factors = {n: (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)) for n in fm.adapters}
    apply_global(fm, GlobalState(factors=factors, scale=1.0), {})
    prompts = [torch.randint(1000, 2000, (n,), generator=g).tolist() for n in (2, 7, 10)]
    choices = [[torch.randint(1000, 2000, (k,), generator=g).tolist() for k in (1, 3, 6)] for _ in prompts]
    # Execute: the choices, then each row's last choice as its reference (and greedy answers after it)
    got = score_choices(fm, prompts, choices, chat_tok.pad_token_id)
    nll, _, _ = score_and_generate(fm, prompts, [row[-1] for row in choices], 3, [chat_tok.sep_token_id],
                                   chat_tok.pad_token_id)
    # Assert: each equals the choice scored after its prompt in one pass of the whole row
    want = [[_direct(fm, p, c) for c in row] for p, row in zip(prompts, choices, strict=True)]
    for g_row, w_row in zip(got, want, strict=True):
        assert g_row == pytest.approx(w_row, rel=1e-5, abs=1e-5)
    assert (-nll).tolist() == pytest.approx([row[-1] for row in want], rel=1e-5, abs=1e-5)


def test_two_labels_of_one_word_are_refused_for_mc(chat_tok, tmp_path):
    # Prepare: SST-5 collapsed by --label-words: labels 1 and 2 are both "bad", so their scores tie and
    # a row was right (label 1, the first of the tie) or wrong (label 2) by which one it was
    from fedlora.data.instructions import load_instructions

    data = tmp_path / "d.csv"
    data.write_text("text,label\nawful,1\nmeh,2\nfine,3\n")
    ds = load_instructions(str(data), "text", "label", "{text}", "1=bad,2=bad,3=good")
    # Execute / Assert
    with pytest.raises(UserError, match=r"^--eval mc: labels '1' and '2' have the same word 'bad'"
                                        r" \(--label-words\), and two choices of one text cannot be told"
                                        r" apart; give each label its own word, or use --eval generate$"):
        get_task("sft").eval_set(chat_tok, ds, _mc())


def test_a_choice_the_tokenizer_encodes_as_no_tokens_is_refused(chat_tok):
    # Prepare: a zero-width space, which this (BERT) tokenizer drops: its choice would have no tokens,
    # so a log-probability of 0 (the highest there is) and it would win every question it is in
    assert chat_tok("\u200b", add_special_tokens=False)["input_ids"] == []
    ds = TextDataset(["pick one", "pick two"], [0, 1], ["A", "B", "C"], None,
                     [["yes", "no", "\u200b"], ["up", "down", "left"]])
    # Execute / Assert
    with pytest.raises(UserError, match=r"^--eval mc: the choice '\\u200b' \(1 example\(s\)\) is no tokens to"
                                        r" this model's tokenizer, so its log-probability would be 0"):
        get_task("sft").eval_set(chat_tok, ds, _mc())


def test_lettered_lists_each_questions_choices_and_makes_the_letters_the_choices():
    ds = TextDataset(["Capital of France?", [{"role": "user", "content": "2+2?"}]], [1, 0], ["A", "B", "C"],
                     ["Paris", "4"], [["Lyon", "Paris", "Nice"], ["4", "5"]])
    got = choice_module.lettered(ds)
    assert got.texts == ["Capital of France?\nA. Lyon\nB. Paris\nC. Nice\nAnswer:",
                         [{"role": "user", "content": "2+2?\nA. 4\nB. 5\nAnswer:"}]]
    assert got.choices == [["A", "B", "C"], ["A", "B"]] and got.labels == [1, 0]
    assert got.responses == ["B", "A"]


def test_mc_letters_scores_each_letter_after_the_listed_choices(fm, chat_tok, tmp_path):
    # Prepare: an MMLU CSV; --eval mc-letters
    spec = tmp_path / "mmlu.csv"
    spec.write_text("question,A,B,C,D,answer\nCapital of France?,Lyon,Paris,Nice,Metz,B\n"
                    "Largest planet?,Mars,Venus,Earth,Jupiter,D\n")
    task, cfg = get_task("sft"), _mc(eval="mc-letters")
    data = task.eval_set(chat_tok, task.load(str(spec), cfg), cfg)
    # Assert: the prompt lists the choices (MiniLM's tokenizer lower-cases and drops newlines)
    shown = [chat_tok.decode(p) for p in data.prompts]
    assert any("capital of france? a. lyon b. paris c. nice d. metz answer :" in p for p in shown)
    letters = [chat_tok(c, add_special_tokens=False)["input_ids"] for c in "ABCD"]
    assert data.choices == [letters, letters] and sorted(data.answers) == [1, 3]
    # Execute, and compare with each letter scored directly after its prompt
    got = task.evaluate(fm, data, cfg)
    want = [[_direct(fm, p, c) for c in row] for p, row in zip(data.prompts, data.choices, strict=True)]
    right = sum(max(range(4), key=w.__getitem__) == a for w, a in zip(want, data.answers, strict=True))
    assert got["mc_accuracy"] == got["mc_accuracy_norm"] == right / 2


def test_mc_letters_refuses_more_choices_than_letters(chat_tok):
    ds = TextDataset(["q"], [0], [], ["c0"], [[f"c{i}" for i in range(27)]])
    with pytest.raises(UserError, match="^--eval mc-letters gives each choice a letter, and a question has"):
        get_task("sft").eval_set(chat_tok, ds, _mc(eval="mc-letters"))
