"""The round line and the personal-accuracy columns of ``fedlora.rounds``."""

from __future__ import annotations

import json

import pytest

from fedlora.rounds.rows import format_row, personal_columns

ROW = {"round": 2, "accuracy": 0.8, "loss": 0.5, "agg_error": None, "bytes_up": 2e6, "bytes_down": 1e6,
       "seconds": 3.0, "eval_seconds": 1.0}


def test_personal_columns_weight_clients_by_their_held_out_examples():
    # 3 of 4 right on one client, 1 of 6 on another: (3 + 1) / 10, not the mean 0.458
    got = personal_columns([{"accuracy": 0.75, "eval_examples": 4}, {"accuracy": 1 / 6, "eval_examples": 6}])
    assert got == {"personal_accuracy": pytest.approx(0.4), "personal_examples": 10, "personal_clients": 2}
    assert personal_columns([]) == {}


def test_round_line_shows_personal_accuracy_only_when_measured():
    assert "personal 0.4000" in format_row({**ROW, "personal_accuracy": 0.4})
    assert "personal" not in format_row(ROW)
    assert "acc 0.8000" in format_row(ROW) and "up 2.00 MB" in format_row(ROW)


def test_a_round_eval_every_skips_says_so_in_its_line():
    line = format_row({**ROW, "accuracy": None, "loss": None})
    assert "not scored (--eval-every)" in line and "loss" not in line and "up 2.00 MB" in line


def test_a_diverged_round_read_back_from_metrics_jsonl_prints_its_line():
    # metrics.jsonl writes a NaN loss as null (strict JSON); fedlora-server and --engine flower print
    # the rows read back from it, and crashed formatting None (the run died with its server)
    line = format_row(json.loads(json.dumps({**ROW, "loss": None})))
    assert "acc 0.8000  loss nan" in line and line == format_row({**ROW, "loss": float("nan")})


@pytest.mark.parametrize("saved, restored", [(0.37, 0.37), (None, 0.1)])
def test_resume_keeps_the_clip_its_clients_trained_with(tmp_path, caplog, stub_coordinator, saved, restored):
    from fedlora.job.schema import JobConfig
    from fedlora.rounds.checkpoint import load_checkpoint, save_checkpoint
    from fedlora.strategies import GlobalState

    # Prepare: a --dp sample job whose clip is measured on --init-data, checkpointed with its clip,
    # and a checkpoint of an older fedlora, which had no "clip" (its clients clipped at the recipe's 0.1)
    cfg = JobConfig(strategy="fedavg", num_clients=2, rounds=3, dp="sample", epsilon=8.0, delta=1e-5,
                    init_data="public.csv", max_grad_norm=None)
    part = stub_coordinator(cfg)
    part.clip, part.state = 0.37, GlobalState(factors={}, scale=1.0)
    path = part.save(tmp_path)
    blob = load_checkpoint(path)
    blob["clip"] = saved
    save_checkpoint(tmp_path, blob)

    # Execute
    resumed = stub_coordinator(cfg)
    resumed.restore(path)

    # Assert: the clip the clients clipped to before; an old checkpoint's fallback is said, not silent
    assert resumed.clip == restored
    assert ("no measured clip" in caplog.text) == (saved is None)


def test_a_fresh_run_leaves_nothing_of_the_adapter_or_checkpoint_it_replaces(tmp_path):
    from fedlora.job.schema import JobConfig
    from fedlora.rounds.sink import RunFolder

    # Prepare: an older run's files (--overwrite); a new run killed before its end used to leave its
    # config.json beside the old adapter, which fedlora-eval --config would score as the new job's
    for folder in ("adapter", "adapters/round-1"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "adapter_model.safetensors").write_bytes(b"old")
    (tmp_path / "checkpoint.safetensors").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's")
    # Execute
    RunFolder(tmp_path).begin(JobConfig())
    # Assert: the new run's config and empty rows; a file fedlora does not write stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl", "notes.txt"]


def test_a_dpo_line_shows_reward_accuracy_once():
    # Prepare: the headline is reward accuracy (held-out pairs), or answer accuracy (label-word pairs)
    dpo = {**ROW, "reward_accuracy": 0.8, "reward_margin": 0.25}
    # Execute
    pairs, answers = (format_row({**dpo, "metric": m}) for m in ("reward_accuracy", "answer_accuracy"))
    # Assert: "reward acc" once either way (it was printed twice when it was the headline)
    assert pairs.count("reward acc") == 1 and "reward acc 0.8000  loss 0.5000" in pairs
    assert answers.count("reward acc") == 1 and "answer acc 0.8000" in answers and "margin 0.2500" in answers


def _strict(text: str):
    """``json.loads`` as a strict reader (jq, JavaScript): NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_rows_are_strict_json_with_a_non_finite_value_as_null(tmp_path):
    from types import SimpleNamespace

    from fedlora.job.schema import JobConfig
    from fedlora.rounds.jsonout import json_line
    from fedlora.rounds.sink import RunFolder

    # a diverged loss and an agg_error whose ideal update is zero were written NaN and Infinity
    row = {"round": 1, "loss": float("nan"), "agg_error": float("inf"), "per": [1.5, float("-inf")],
           "nested": {"x": float("nan")}, "accuracy": 0.5}
    assert json_line(row) == ('{"round": 1, "loss": null, "agg_error": null, "per": [1.5, null],'
                              ' "nested": {"x": null}, "accuracy": 0.5}')
    folder = RunFolder(tmp_path)
    folder.begin(JobConfig())
    folder.commit(row, SimpleNamespace(cfg=JobConfig()))
    folder.resume([row, {**row, "round": 2}])
    rows = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["loss"] is None and rows[0]["accuracy"] == 0.5
    assert row["loss"] != row["loss"]            # the row the loop and trackers hold keeps its NaN
