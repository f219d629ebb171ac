"""--fewshot N: held-out prompts led by N other held-out examples and their answers, as chat turns."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fedlora.data.loading import TextDataset
from fedlora.errors import UserError
from fedlora.job.checks import check_job_args
from fedlora.job.schema import JobConfig
from fedlora.tasks import get_task
from fedlora.tasks.fewshot import with_shots


def _ds() -> TextDataset:
    return TextDataset([f"q{i}" for i in range(5)], None, [], [f"a{i}" for i in range(5)])


def test_each_prompt_is_led_by_other_examples_and_their_answers_as_turns():
    got = with_shots(_ds(), 2, seed=0)
    for i, turns in enumerate(got.texts):
        assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant", "user"]
        assert turns[-1] == {"role": "user", "content": f"q{i}"}
        shots = [m["content"] for m in turns[:-1]]
        # each shot's answer is its own question's; never the question itself; two different shots
        assert [s[1:] for s in shots[0::2]] == [s[1:] for s in shots[1::2]] and f"q{i}" not in shots
        assert shots[0] != shots[2]
    assert got.responses == _ds().responses                           # the answers scored are unchanged
    assert with_shots(_ds(), 2, seed=0).texts == got.texts            # drawn from --seed
    assert with_shots(_ds(), 2, seed=1).texts != got.texts
    assert with_shots(_ds(), 0, seed=0).texts == _ds().texts


def test_a_chats_system_message_stays_first_and_shots_carry_none():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    other = [*chat[:1], {"role": "user", "content": "hey there"}]
    ds = TextDataset([chat, other], None, [], ["hello", "hey"])
    got = with_shots(ds, 1, seed=0).texts[0]
    assert [m["role"] for m in got] == ["system", "user", "assistant", "user"]
    assert got[2] == {"role": "assistant", "content": "hey"}


def test_too_few_held_out_examples_and_other_tasks_are_refused():
    with pytest.raises(UserError, match=r"^--fewshot 5 leads each held-out question with 5 others and their"
                                        r" answers, and there are 5 held-out examples"):
        with_shots(_ds(), 5, seed=0)
    with pytest.raises(UserError, match=r"^--fewshot is for --task sft \(this job is --task classifi"):
        check_job_args(JobConfig(fewshot=2))
    with pytest.raises(UserError, match=r"^--fewshot must be ≥ 0 \(0: none\), got -1"):
        check_job_args(JobConfig(task="sft", model="smollm2", fewshot=-1))


def test_mc_letters_shots_are_lettered_and_answered_by_letter(tiny_chat_llama_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    spec = tmp_path / "mmlu.csv"
    spec.write_text("question,A,B,C,D,answer\nCapital of France?,Lyon,Paris,Nice,Metz,B\n"
                    "Largest planet?,Mars,Venus,Earth,Jupiter,D\n")
    task = get_task("sft")
    cfg = JobConfig(task="sft", model="unused", eval="mc-letters", fewshot=1, max_length=128)
    data = task.eval_set(tok, task.load(str(spec), cfg), cfg)
    shown = {tok.decode(p) for p in data.prompts}
    # the other question, lettered, answered by its letter, then the question itself
    france = "capital of france? a. lyon b. paris c. nice d. metz answer : [SEP] assistant :"
    planet = "largest planet? a. mars b. venus c. earth d. jupiter answer : [SEP] assistant :"
    assert shown == {f"user : {planet} d [SEP] user : {france}", f"user : {france} b [SEP] user : {planet}"}
    cfg = JobConfig(task="sft", model="unused", eval="generate", fewshot=1, max_length=128)
    answers = task.eval_set(tok, task.load(str(spec), cfg), cfg)
    assert any("assistant : jupiter [SEP]" in tok.decode(p) for p in answers.prompts)  # mc file: the texts


def test_a_copy_of_the_question_is_never_its_shot():
    # Prepare: two identical held-out rows (BBC News holds 98 such articles): either one as the
    # other's shot would give its answer away
    ds = TextDataset(["q0", "q1", "q1", "q3"], None, [], ["a0", "a1", "a1", "a3"])
    for seed in range(20):
        # Act
        got = with_shots(ds, 2, seed=seed)
        # Assert
        for i in (1, 2):
            assert {m["content"] for m in got.texts[i][:-1]} == {"q0", "a0", "q3", "a3"}
    with pytest.raises(UserError, match=r"there are 4 held-out examples \(3 different questions\)"):
        with_shots(ds, 3, seed=0)
    # rows without copies are drawn as before (a question's shots do not change)
    assert with_shots(_ds(), 2, seed=0).texts[0][0]["content"] == "q1"
