"""End to end on loopback: real fedlora-server and fedlora-client processes (tiny BERT).

Only what needs processes: a folding strategy over gRPC (FLoRA, equal to the simulator), sample-level
DP resumed after a SIGKILL, a resume that gives the uninterrupted adapter, a killed client, TLS with
node authentication, and ``flwr run`` of the repository's app (a 500 MB reply: ``test_oversize.py``).
Every strategy's deployment == simulator parity runs the same ServerApp and ClientApp in one process
(``test_grid_parity.py``).

Clients stay up across the tests of a module: every new fedlora-server starts a new
SuperLink on the same port and the clients reconnect to it by themselves.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from tests.server.deploy_helpers import (
    adapter_tensors,
    client,
    free_port,
    make_node_key,
    make_pki,
    rows,
    server,
    wait_for_round,
)

pytestmark = pytest.mark.slow


def wait_port_free(port: int, timeout: float) -> None:
    """The killed server's SuperLink (SIGTERMed as its parent died) lets go of the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.3)
    raise AssertionError(f"port {port} still in use after {timeout}s")


def wait_port_open(port: int, timeout: float) -> None:
    """Something accepts connections on ``port`` (then a moment for its other services)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(1)
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on port {port} after {timeout}s")


def job(tiny_bert_dir, tiny_csv, clients: int = 2) -> list[str]:
    """Job flags shared by fedlora-sim and fedlora-server."""
    return ["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--num-clients", str(clients),
            "--local-steps", "2", "--batch-size", "4", "--max-length", "16", "--rank", "4"]


WAIT = ["--round-timeout", "60"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A port and two insecure clients (partitions 0 and 1 of 2) that outlive each server."""
    tmp = tmp_path_factory.mktemp("plain")
    port = free_port()
    procs = [client(tmp, port, k, 2, "--insecure") for k in range(2)]
    yield tmp, port, procs
    for p in procs:
        p.kill()


#: FedSA-LoRA's clients keep B, so their models are measured on their own held-out examples.
PERSONAL = ["--personal-test-fraction", "0.3"]


@pytest.fixture(scope="module")
def flora_runs(plain, tiny_bert_dir, tiny_csv, tmp_path_factory):
    """FLoRA (the base folds every round) for 2 rounds: deployed to the module's clients, and the
    same job in fedlora-sim. ``(deployed out, simulator out, server exit code, server log)``."""
    from fedlora.simulations.cli import main as sim

    tmp, port, _ = plain
    flags = ["--strategy", "flora", "--rounds", "2", *job(tiny_bert_dir, tiny_csv)]
    out, sim_out = tmp / "run-flora", tmp_path_factory.mktemp("sim-flora")
    srv = server(tmp, port, out, "--insecure", *flags, *WAIT, name="server-flora")
    code = srv.wait(240)
    assert sim([*flags, "--quiet", "--out", str(sim_out)]) == 0
    return out, sim_out, code, srv.text()


def test_folding_strategy_runs_two_rounds_over_grpc(flora_runs):
    out, _, code, log = flora_runs
    # Assert: finished, rounds 0..2 with both clients and bytes both ways, and a PEFT export
    assert code == 0, log[-3000:]
    got = rows(out)
    assert [r["round"] for r in got] == [0, 1, 2]
    for r in got[1:]:
        assert r["clients"] == 2 and r["rejected"] == [] and r["failed"] == 0
        assert len(r["bytes_up_per_client"]) == 2 and min(r["bytes_up_per_client"]) > 0
        assert r["bytes_down"] > 0 and 0 <= r["accuracy"] <= 1
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert any(k.endswith("lora_A.weight") for k in adapter_tensors(out))
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


def test_folding_strategy_over_grpc_matches_the_simulator(flora_runs):
    out, sim_out, code, log = flora_runs
    assert code == 0, log[-3000:]
    # Assert: identical bytes up and down per client (the folds re-sent), the same adapter
    for s, d in zip(rows(sim_out), rows(out), strict=True):
        assert s["bytes_up_per_client"] == d["bytes_up_per_client"]
        assert s["bytes_down_per_client"] == d["bytes_down_per_client"]
    a, b = adapter_tensors(sim_out), adapter_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_dp_run_resumed_after_a_kill_gives_the_uninterrupted_adapter_and_ledgers(plain, tiny_bert_dir,
                                                                                   tiny_csv):
    # Prepare: an uninterrupted 3-round run of FedSA-LoRA under sample-level DP (the server keeps the
    # global A, the clients keep their own B and their privacy ledgers: every side's state must
    # survive the kill; noise and batches keyed to the seed, so the two runs can be compared)
    from fedlora.privacy.accounting import spent

    tmp, port, _ = plain
    args = ["--insecure", "--rounds", "3", "--strategy", "fedsa-lora", "--dp", "sample", "--epsilon", "1000",
            "--noise-multiplier", "1.0", "--delta", "1e-3", "--dp-reproducible",
            *job(tiny_bert_dir, tiny_csv), *PERSONAL, *WAIT]
    full = tmp / "full"
    assert server(tmp, port, full, *args, name="server-full").wait(240) == 0
    # Execute: the same run killed (SIGKILL, SuperLink included) after round 1, then resumed
    cut = tmp / "cut"
    srv = server(tmp, port, cut, *args, name="server-cut")
    wait_for_round(cut, 1, 120)
    srv.kill()
    assert json.loads((cut / "status.json").read_text())["state"] == "running"
    wait_port_free(port, 30)
    resumed = server(tmp, port, cut, "--insecure", "--resume", str(cut), "--round-timeout", "60",
                     name="server-resumed")
    assert resumed.wait(240) == 0, resumed.text()[-3000:]
    # Assert: rounds 0..3 once each, and the same adapter and clients' own models as the
    # uninterrupted run (a redone round starts from the B each client kept before it)
    got = rows(cut)
    assert [r["round"] for r in got] == [0, 1, 2, 3]
    for x, y in zip(rows(full)[1:], got[1:], strict=True):
        assert y["personal_accuracy"] == x["personal_accuracy"]
    a, b = adapter_tensors(full), adapter_tensors(cut)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # ... every round reports the ε spent, growing; each client's ledger continued across the
    # resumed run (a new Flower run, the same DP run id): 3 rounds × 2 local steps, 8 if the killed
    # server had started round 2 (a redone round is paid again); reported ε = the accountant's for
    # those steps at q = 4/50 (72 examples per client, 22 of them held out)
    assert [r["dp"] for r in got[1:]] == ["sample"] * 3 and got[1]["dp_backend"] == "opacus"
    assert 0 < got[1]["epsilon"] < got[2]["epsilon"] < got[3]["epsilon"]
    run_id = json.loads((cut / "config.json").read_text())["dp_run_id"]
    ledgers = sorted((tmp / "ledgers").glob(f"{run_id}-client*.json"))
    steps = [json.loads(p.read_text())["steps"] for p in ledgers]
    assert len(steps) == 2 and set(steps) <= {6, 8}
    assert got[3]["epsilon_per_client"] == [pytest.approx(spent(1.0, 4 / 50, s, 1e-3), abs=1e-3)
                                            for s in steps]


def test_tls_and_node_auth_refuse_an_unregistered_node(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: certificates, two registered node keys and one unregistered
    pki = make_pki(tmp_path)
    keys = [make_node_key(tmp_path, f"node{k}") for k in range(3)]
    port = free_port()
    tls = ["--root-certificates", str(pki["ca"])]
    procs = [client(tmp_path, port, k, 2, *tls, "--auth-key", str(keys[k][0])) for k in range(2)]
    procs.append(client(tmp_path, port, 1, 2, *tls, "--auth-key", str(keys[2][0]), name="intruder"))
    out = tmp_path / "out"
    try:
        # Execute
        srv = server(tmp_path, port, out, "--ssl-certfile", str(pki["cert"]), "--ssl-keyfile",
                     str(pki["key"]), "--ssl-ca-certfile", str(pki["ca"]), "--auth-keys",
                     str(keys[0][1]), str(keys[1][1]), "--rounds", "2", *job(tiny_bert_dir, tiny_csv), *WAIT)
        code = srv.wait(240)
        intruder = procs[2].text()
    finally:
        for p in procs:
            p.kill()
    # Assert: the run finished over TLS with the two registered nodes; the third never trained
    assert code == 0, srv.text()[-3000:]
    assert [r["clients"] for r in rows(out)[1:]] == [2, 2]
    assert "task completed" not in intruder and "Failed to activate SuperNode" in intruder
    assert "task completed" in procs[0].text()


def test_flwr_run_of_the_repository_app(plain, tiny_bert_dir, tiny_csv):
    # Prepare: a bare SuperLink on the clients' port and a flwr connection to it
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.server.deploy_helpers import Proc

    tmp, port, _ = plain
    home = tmp / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    wait_port_free(port, 30)  # an earlier test's SuperLink on the clients' port has gone
    link = Proc("flower-superlink", ["--insecure", "--disable-runtime-dependency-installation",
                                     "--port", str(port)], tmp / "bare-superlink.log")
    out = tmp / "flwr-run"
    overrides = (f"model='{tiny_bert_dir}' data='{tiny_csv}' num-clients=2 rounds=1 local-steps=2"
                 f" batch-size=4 max-length=16 rank=4 round-timeout=60.0 out='{out}'")
    try:
        wait_port_open(port, 60)  # the SuperLink is up (a fixed wait is too short on a busy machine)
        # Execute: `flwr run .` from the repository root
        root = Path(__file__).resolve().parents[2]
        res = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(root), "local",
                              "--run-config", overrides], env=dict(os.environ, FLWR_HOME=str(home)),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        deadline = time.monotonic() + 180
        status = out / "status.json"
        while time.monotonic() < deadline and not (
                status.is_file() and json.loads(status.read_text())["state"] != "running"):
            time.sleep(0.5)
    finally:
        link.kill(15)
    # Assert: the ServerApp ran the job from the run config and wrote its results
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert [r["round"] for r in rows(out)] == [0, 1] and rows(out)[1]["clients"] == 2
