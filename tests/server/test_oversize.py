"""A 500 MB reply is refused by the SuperLink before it costs the server memory (real processes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.server.deploy_helpers import client, free_port, rows, server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("load_benchmark", ROOT / "benchmarks" / "load.py")
load = sys.modules["load_benchmark"] = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(load)

#: Loaded first by the dishonest client's interpreter: every upload of it carries 500 MB.
HUGE = '''
import torch
import fedlora.training.client as local

_fit = local.LocalClient.fit


def fit(self, rnd):
    up, loss, seconds = _fit(self, rnd)
    up[next(iter(up))] = torch.zeros(125_000_000)  # 500 MB of float32
    return up, loss, seconds


local.LocalClient.fit = fit
'''


def run(tmp: Path, tiny_bert_dir, tiny_csv, huge: bool) -> tuple[int, list[dict], int]:
    """One round with two clients (client 1 sends 500 MB if ``huge``): exit code, rows, peak RSS
    of the server's process tree (fedlora-server and every process below it: SuperLink, ServerApp)."""
    tmp.mkdir()
    (tmp / "sitecustomize.py").write_text(HUGE)
    port, out = free_port(), tmp / "out"
    srv = server(tmp, port, out, "--insecure", "--model", str(tiny_bert_dir), "--data", str(tiny_csv),
                 "--num-clients", "2", "--rounds", "1", "--local-steps", "1", "--batch-size", "4",
                 "--max-length", "16", "--rank", "4", "--min-replies", "1", "--round-timeout", "20")
    memory = load.PeakMemory({"server": [srv.p.pid]}, period=0.05)
    memory.start()
    procs = [client(tmp, port, 0, 2, "--insecure"),
             client(tmp, port, 1, 2, "--insecure", env={"PYTHONPATH": str(tmp)} if huge else None)]
    try:
        code = srv.wait(240)
    finally:
        memory.stop.set()
        for p in procs:
            p.kill()
    return code, rows(out), memory.peak["server"]


def test_500_mb_reply_is_refused_and_server_memory_stays_put(tiny_bert_dir, tiny_csv, tmp_path):
    # Act: the same job with two honest clients, then with client 1 sending 500 MB
    code, _, usual = run(tmp_path / "honest", tiny_bert_dir, tiny_csv, huge=False)
    assert code == 0
    code, got, peak = run(tmp_path / "huge", tiny_bert_dir, tiny_csv, huge=True)
    # Assert: the round completes with the honest client alone, the huge reply counted as failed,
    # and the server's peak memory stays below twice its usual peak (500 MB would not fit)
    assert code == 0
    assert got[-1]["clients"] == 1 and got[-1]["failed"] == 1
    assert "413" in (tmp_path / "huge" / "out" / "superlink.log").read_text()
    # (measured: 1199 and 1202 MiB for fedlora-server, SuperLink and ServerApp; reading the reply
    # would add at least its 500 MB)
    sizes = f"honest {usual / 2**20:.0f} MiB, with the 500 MB reply {peak / 2**20:.0f} MiB"
    assert peak < 2 * usual and peak < usual + 400 * 2 ** 20, sizes
