"""The ServerApp's boundary: a job that arrives as a Flower run config is checked once, as its flags
would be, and a refusal lands in ``status.json`` (where ``fedlora-server`` reads it)."""

from __future__ import annotations

import json

import pytest

from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.server.app import run_server
from fedlora.server.launch import run_config


@pytest.mark.parametrize("kw, words", [
    (dict(strategy="flora", dp="client", epsilon=8.0), "--dp client needs a strategy whose aggregate"),
    (dict(attack="flip", attackers=1), "attack is simulated by fedlora-sim's batched engine only"),
])
def test_a_bad_run_config_is_refused_before_anything_loads(tmp_path, kw, words):
    # Prepare: a job no flag check would let through (the model does not even exist)
    rc = run_config(JobConfig(model=str(tmp_path / "no-model"), **kw), tmp_path / "out")
    # Execute
    with pytest.raises(UserError, match=words):
        run_server(None, rc)
    # Assert: the reason is the run's status, in one line
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "failed" and words in status["error"] and "\n" not in status["error"]


def test_a_job_refused_in_the_serverapps_setup_leaves_the_earlier_run(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: an earlier run's files in --out; a job whose model has no layer --target-modules names
    out = tmp_path / "out"
    out.mkdir()
    names = ("metrics.jsonl", "config.json", "checkpoint.safetensors")
    earlier = {name: f"earlier {name}\n" for name in names}
    for name, text in earlier.items():
        (out / name).write_text(text)
    rc = run_config(JobConfig(model=str(tiny_bert_dir), data=str(tiny_csv), num_clients=2,
                              target_modules=["nosuch"]), out)
    # Execute
    with pytest.raises(UserError, match="no linear layer matches nosuch"):
        run_server(None, rc)
    # Assert: the earlier run's files are as they were; the status says refused (fedlora-server exits 2)
    # and not begun (it reads no rows of the earlier metrics.jsonl as this run's)
    assert {name: (out / name).read_text() for name in earlier} == earlier
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["refused"] is True and "begun" not in status


def test_fedlora_server_reads_rows_only_once_the_run_has_begun(tmp_path):
    from types import SimpleNamespace

    from fedlora.server.launch import follow

    # Prepare: an earlier run's two rows; the new run's status before and after it began
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
    link = SimpleNamespace(proc=SimpleNamespace(poll=lambda: None))
    seen = []
    for begun in (False, True):
        status = {"run_id": "7", "state": "failed", **({"begun": True} if begun else {})}
        (tmp_path / "status.json").write_text(json.dumps(status))
        # Execute
        follow(tmp_path, link, seen.append, 7, poll=0.0)
    # Assert: none before (they were the earlier run's), both once begun
    assert seen == [{"round": 0}, {"round": 1}]
