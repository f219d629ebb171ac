"""fedlora-sim --resume: a run stopped after a round continues to what the uninterrupted run reaches."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from fedlora.simulations.cli import main

pytestmark = pytest.mark.slow  # five CLI runs end to end

#: Kept factors (FedSA-LoRA's B), error feedback (top-k) and DP-SGD ledgers: the state a simulated
#: client holds between rounds, which the checkpoint must carry (and --lora-dropout's masks, keyed to
#: the round, which the resumed rounds must draw as the uninterrupted run did).
STATEFUL = ["--strategy", "fedsa-lora", "--personal-test-fraction", "0.3", "--compress", "topk:0.5",
            "--dp", "sample", "--epsilon", "8", "--delta", "1e-3", "--dp-reproducible",
            "--lora-dropout", "0.1"]
TIMES = ("seconds", "train_seconds", "eval_seconds", "pass_seconds")


def _job(tiny_bert_dir, tiny_csv, *extra) -> list[str]:
    return ["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--num-clients", "3",
            "--local-steps", "2", "--batch-size", "4", "--max-length", "16", "--rank", "2", "--lr", "0.01",
            "--quiet", *extra]


def _rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def test_a_stopped_run_resumes_to_the_uninterrupted_runs_rows_and_adapter(tiny_bert_dir, tiny_csv, tmp_path,
                                                                          stop_after_round):
    # Prepare: the uninterrupted run, and the same job stopped (Ctrl-C) once round 2 is committed
    job = _job(tiny_bert_dir, tiny_csv, *STATEFUL, "--rounds", "3")
    assert main([*job, "--out", str(tmp_path / "straight")]) == 0
    stop_after_round(2)
    assert main([*job, "--out", str(tmp_path / "cut")]) == 130
    stop_after_round(None)
    assert len(_rows(tmp_path / "cut")) == 3 and not (tmp_path / "cut" / "adapter").exists()
    # Execute
    assert main([*job, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    # Assert: the same rows (the clients' ε, personal accuracy, compression error) and adapter; the
    # first resumed round re-sends the shared factors, which a restarted server cannot know are held
    got, want = _rows(tmp_path / "cut"), _rows(tmp_path / "straight")
    assert got[3]["bytes_down"] > want[3]["bytes_down"]
    down = ("bytes_down", "bytes_down_per_client")
    assert [{k: v for k, v in r.items() if k not in down} for r in got] == \
        [{k: v for k, v in r.items() if k not in down} for r in want]
    assert [[r[k] for k in down] for r in got[:3]] == [[r[k] for k in down] for r in want[:3]]
    want = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


def test_resume_refusals_are_one_line_and_keep_the_run(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    # Prepare: a finished 2-round run
    job = _job(tiny_bert_dir, tiny_csv, "--rounds", "2")
    out = tmp_path / "run"
    assert main([*job, "--out", str(out)]) == 0
    kept = (out / "metrics.jsonl").read_text()
    private, dp = tmp_path / "dp", ["--dp", "sample", "--epsilon", "8", "--delta", "1e-3"]
    assert main([*job[:-2], "--rounds", "1", *dp, "--out", str(private)]) == 0
    edited = tmp_path / "edited.csv"  # a run on a copy of the data, which is then edited in place
    edited.write_text(tiny_csv.read_text())
    on_copy = _job(tiny_bert_dir, edited, "--rounds", "1")
    assert main([*on_copy, "--out", str(tmp_path / "copy")]) == 0
    edited.write_text("".join(edited.read_text().splitlines(keepends=True)[:-1]))  # one row fewer
    capsys.readouterr()
    cases = {
        "no checkpoint": ([*job, "--out", str(tmp_path / "empty"), "--resume"], "holds no checkpoint"),
        "another job": ([*job, "--lr", "0.02", "--out", str(out), "--resume"],
                        "the stopped run's --lr was 0.01, not 0.02"),
        "past its rounds": ([*job[:-2], "--rounds", "1", "--out", str(out), "--resume"],
                            "is past round 1 already (round 2); pass --rounds 2 or more"),
        "flower": ([*job, "--out", str(out), "--resume", "--engine", "flower"],
                   "--resume continues a batched"),
        "and overwrite": ([*job, "--out", str(out), "--resume", "--overwrite"],  # it resumed
                          "--resume continues the stopped run in --out and --overwrite replaces it"),
        # σ was set for 1 round at ε = 8: a second would spend more than ε (its row said less)
        "more private rounds": ([*job, *dp, "--out", str(private), "--resume"],
                                "its 1 round spend ε = 8 (--dp sample); it cannot go to 2 rounds"),
        # its clients' partitions and held-out set would change between rounds (it carried on)
        "edited data": ([*on_copy[:-2], "--rounds", "2", "--out", str(tmp_path / "copy"), "--resume"],
                        f"--resume: --data {str(edited)!r} has changed since the stopped run read it"),
    }
    for argv, message in cases.values():
        # Execute
        code = main(argv)
        # Assert
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0]
    assert (out / "metrics.jsonl").read_text() == kept


@pytest.mark.parametrize("more", [4])
def test_a_finished_run_resumes_to_more_rounds(tiny_bert_dir, tiny_csv, tmp_path, more):
    job = _job(tiny_bert_dir, tiny_csv)
    assert main([*job, "--rounds", "2", "--out", str(tmp_path / "r")]) == 0
    assert main([*job, "--rounds", str(more), "--out", str(tmp_path / "r"), "--resume"]) == 0
    assert main([*job, "--rounds", str(more), "--out", str(tmp_path / "straight")]) == 0
    assert _rows(tmp_path / "r") == _rows(tmp_path / "straight")
