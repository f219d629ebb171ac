"""Deployment == simulator with compressed updates (--compress, --compress-down), without processes.

The real ServerApp and ClientApps over the in-memory grid of ``test_grid_parity.py``: the clients code
their uploads and keep their error-feedback residual (in memory, or in ``context.state`` when every
message rebuilds them, as on Flower's simulation engine), the server decodes; the simulator must
count the same bytes each way and reach the same adapter.
"""

from __future__ import annotations

import pytest

from tests.server.local_grid import assert_same_adapter
from tests.server.test_grid_parity import deploy, job, simulate

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("strategy", "coding", "stateless"), [
    ("fedavg", ["--compress", "int8", "--compress-down", "nf4"], False),
    ("fed-sb", ["--compress", "topk:0.3"], True),
])
def test_compressed_deployment_matches_the_simulator(tiny_bert_dir, tiny_csv, tmp_path, strategy, coding,
                                                     stateless):
    # Prepare: a 2-round job (round 1's residual is in round 2's upload)
    flags = ["--strategy", strategy, "--rounds", "2", *job(tiny_bert_dir, tiny_csv), *coding]
    # Execute
    want = simulate(flags, tmp_path / "sim")
    got = deploy(flags, tmp_path / "grid", 2, stateless=stateless)
    # Assert: every round's bytes per client (down: stateless clients are re-sent the shared factors
    # every round) and the coding's error agree, and the adapter
    for s, d in zip(want, got, strict=True):
        assert s["bytes_up_per_client"] == d["bytes_up_per_client"]
        assert stateless or s["bytes_down_per_client"] == d["bytes_down_per_client"]
    assert [s["compress_error"] for s in want[1:]] == pytest.approx([d["compress_error"] for d in got[1:]],
                                                                    rel=1e-3)
    assert all(r["compress_error"] > 0 and r["rejected"] == [] for r in got[1:])
    assert_same_adapter(tmp_path / "sim", tmp_path / "grid", rtol=1e-4, atol=5e-5)
