"""``benchmarks/load.py`` at a small size: real server and client processes, one SIGKILLed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_load_benchmark_survives_a_killed_client_and_replays_the_adapter(tmp_path):
    # Act: 3 client processes, the last one SIGKILLed (with its SuperNode) as round 2 starts, 2 rounds
    # of one local step, a round timeout of 300 s
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load.py"), "--clients", "3",
                          "--kill", "1", "--kill-round", "2", "--rounds", "2", "--local-steps", "1",
                          "--round-timeout", "300", "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    out = res.stdout
    # Assert: the killed client did not stop the run: every round completed and was checkpointed;
    # round 2 aggregated the 2 survivors (the dead client, sampled in round 2, counted as failed),
    # nothing was rejected; the adapter equals the batched replay
    assert res.returncode == 0, (out + res.stderr)[-3000:]
    table = [ln.split("|")[1:-1] for ln in out.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [int(r[0]) for r in table] == [1, 2]
    assert [int(r[2]) for r in table] == [3, 2]
    assert int(table[1][3]) == 1 and [int(r[4]) for r in table] == [0, 0]
    # ... and no round waited for the 300 s timeout: the dead node was declared so within ~20 s (two
    # heartbeat intervals of 10 s), where Flower's default would take 60 s
    assert max(float(r[1]) for r in table[1:]) < 45, table
    assert "every round in metrics.jsonl and checkpoint.safetensors (round 2): True" in out
    assert "final adapter = clean batched run over the same clients per round: True" in out
