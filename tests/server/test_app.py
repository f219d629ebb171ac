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
