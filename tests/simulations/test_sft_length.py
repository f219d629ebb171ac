"""``--task sft`` without ``--max-length``: derived once from the training data, printed, and carried
to the clients in the run config; an explicit ``--max-length`` wins."""

from __future__ import annotations

import json

import pytest

from fedlora.job.setup import LENGTH_CAP, derived_max_length
from fedlora.simulations.cli import build_parser, check_args


def test_the_95th_percentile_rounded_up_to_8_within_the_caps():
    # 20 examples of 1..20 tokens: 95% of them (19) fit in 19 tokens, rounded up to 24
    totals = list(range(1, 21))
    assert derived_max_length(totals, [2] * 20) == (24, 19)
    # a response (never cut) longer than that raises it: 30 -> 32
    assert derived_max_length(totals, [2] * 19 + [30]) == (32, 19)
    # a multiple of 8 stays; long examples stop at the cap, or at the model's context
    assert derived_max_length([16] * 10, [1] * 10) == (16, 16)
    assert derived_max_length([5000] * 10, [1] * 10) == (LENGTH_CAP, 5000) == (512, 5000)
    assert derived_max_length([5000] * 10, [1] * 10, context=128) == (128, 5000)
    # a response of 16 tokens needs a token of prompt beside it: 17, rounded up to 24 (it was 16)
    assert derived_max_length([10] * 3, [16] * 3) == (24, 10)
    # one example: its own length
    assert derived_max_length([9], [3]) == (16, 9)


@pytest.fixture()
def counted(tmp_path):
    """20 prompt/response rows whose prompts are 1..20 words of one token each, a test file apart
    (so every row trains). With ``--chat-template plain`` an example is its prompt's tokens, then
    ``yes`` and the end of text ``[SEP]``: 3..22 tokens."""
    data, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"prompt": " ".join(["the"] * n), "response": "yes"}) + "\n"
                            for n in range(1, 21)))
    test.write_text(json.dumps({"prompt": "the", "response": "yes"}) + "\n")
    return data, test


def _flags(model, data, test, *extra):
    return ["--task", "sft", "--model", str(model), "--data", str(data), "--test-data", str(test),
            "--chat-template", "plain", "--num-clients", "2", *extra]


def test_sft_derives_max_length_from_its_training_data(tiny_chat_llama_dir, counted, tmp_path, capsys):
    # Execute
    cfg = check_args(build_parser().parse_args([*_flags(tiny_chat_llama_dir, *counted), "--out",
                                                str(tmp_path / "o")]))
    # Assert: the 19th of 20 lengths 3..22 is 21, rounded up to 24 (the model's context is 128)
    assert cfg.max_length == 24
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedlora: --max-length 24 (the 95th percentile of 20 tokenized training examples is 21"
                   " tokens; rounded up to a multiple of 8, at most 128); pass --max-length to choose"]


def test_an_explicit_max_length_wins_and_other_tasks_keep_64(tiny_chat_llama_dir, counted, tmp_path, capsys):
    cfg = check_args(build_parser().parse_args([*_flags(tiny_chat_llama_dir, *counted), "--max-length", "16",
                                                "--out", str(tmp_path / "o")]))
    assert cfg.max_length == 16 and capsys.readouterr().err == ""
    data, _ = counted
    lm = check_args(build_parser().parse_args(["--task", "causal-lm", "--model", str(tiny_chat_llama_dir),
                                               "--data", str(data), "--text-column", "prompt",
                                               "--out", str(tmp_path / "lm"), "--quiet"]))
    assert lm.max_length == 64


def test_fedlora_server_sends_the_derived_value_in_the_run_config(tiny_chat_llama_dir, counted, tmp_path):
    # Execute: the job fedlora-server submits (clients read the run config, never the data's lengths)
    from fedlora.job.runconfig import from_run_config
    from fedlora.server.cli import build_parser as server_parser
    from fedlora.server.cli import job_for
    from fedlora.server.launch import run_config

    args = server_parser().parse_args([*_flags(tiny_chat_llama_dir, *counted), "--insecure", "--quiet",
                                       "--out", str(tmp_path / "srv")])
    cfg, out = job_for(args)
    rc = run_config(cfg, out)
    # Assert: the number travels, and a client's job has it
    assert rc["max-length"] == 24 and from_run_config(rc).max_length == 24


def test_fedlora_eval_derives_mc_letters_length_from_the_prompts_with_their_choices(tiny_chat_llama_dir,
                                                                                     tmp_path, capsys):
    # without --data, --max-length is read from the test examples: under --eval mc-letters their prompts
    # list every choice, which a length read from the bare questions cut from the left (the question lost)
    from fedlora.simulations.evaluate import main as evaluate

    spec = tmp_path / "mmlu.csv"
    question = "which of the following words is the name of a colour that the sky has on a clear day"
    spec.write_text("question,A,B,C,D,answer\n" + "".join(
        f"{question} {i}?,the red of fire,the blue of the sea,the green of grass,the black of night,B\n"
        for i in range(8)))
    assert evaluate(["--task", "sft", "--model", str(tiny_chat_llama_dir), "--eval", "mc-letters",
                     "--test-data", str(spec), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "fedlora: --max-length " in err and "were cut" not in err


def test_a_length_derived_for_other_columns_is_derived_again(tiny_chat_llama_dir, tmp_path):
    # one process (fedlora-compare) deriving for one file under two --columns: a prompt joined from
    # two columns is longer than one of them, and its length is its own, not the first job's
    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import resolve_max_length

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"background": " ".join(["the"] * 30), "q": "the", "a": "yes"}) + "\n"
                            for _ in range(4)))
    job = {"task": "sft", "model": str(tiny_chat_llama_dir), "data": str(data), "chat_template": "plain",
           "max_length": None, "test_fraction": 0.25}
    short = JobConfig(**job, columns="prompt=q,response=a")
    joined = JobConfig(**job, columns="prompt=background+q,response=a")
    resolve_max_length(short, quiet=True)
    resolve_max_length(joined, quiet=True)
    assert short.max_length == 8 and joined.max_length == 40


def test_fedlora_eval_derives_the_length_of_few_shot_prompts_from_them(tiny_chat_llama_dir, tmp_path, capsys):
    # --fewshot 3 makes each prompt four questions long: a length read from one question cut them all
    from fedlora.simulations.evaluate import main as evaluate

    spec = tmp_path / "qa.jsonl"
    spec.write_text("".join(f'{{"prompt": "what is the colour of the sky over the sea number {i}",'
                            f' "response": "blue {i}"}}\n' for i in range(8)))
    assert evaluate(["--task", "sft", "--model", str(tiny_chat_llama_dir), "--fewshot", "3",
                     "--test-data", str(spec), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "fedlora: --max-length " in err and "were cut" not in err
