"""End to end on loopback: real fedlora-server and fedlora-client processes (tiny BERT).

Only what needs processes, every run over TLS with node authentication (an unregistered node is
refused): a folding strategy over HTTPS (FLoRA, equal to the simulator), a DP run SIGKILLed and
resumed to the uninterrupted adapter, and ``flwr run`` of the repository's app (a killed client:
``tests/benchmarks/test_load.py``; a 500 MB reply: ``test_oversize.py``). Every strategy's
deployment == simulator parity runs the same ServerApp and ClientApp in one process
(``test_grid_parity.py``).

Clients stay up across the tests of a module: every new fedlora-server starts a new
SuperLink on the same port and the clients reconnect to it by themselves.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class Nodes:
    """The module's SuperLink port, TLS material and client processes."""

    tmp: Path
    port: int
    procs: list  # client 0, client 1 (registered), the intruder (not registered)
    pki: dict[str, Path]
    keys: list[tuple[Path, Path]]

    @property
    def secure(self) -> list[str]:
        """fedlora-server's TLS and node-authentication flags (the two registered nodes)."""
        return ["--ssl-certfile", str(self.pki["cert"]), "--ssl-keyfile", str(self.pki["key"]),
                "--ssl-ca-certfile", str(self.pki["ca"]), "--auth-keys", str(self.keys[0][1]),
                str(self.keys[1][1])]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """A port, a CA and server certificate, and three TLS clients that outlive each server: two
    with registered node keys (partitions 0 and 1 of 2) and an intruder whose key is not."""
    tmp = tmp_path_factory.mktemp("nodes")
    pki = make_pki(tmp)
    keys = [make_node_key(tmp, f"node{k}") for k in range(3)]
    port = free_port()
    tls = ["--root-certificates", str(pki["ca"])]
    procs = [client(tmp, port, k, 2, *tls, "--auth-key", str(keys[k][0])) for k in range(2)]
    procs.append(client(tmp, port, 1, 2, *tls, "--auth-key", str(keys[2][0]), name="intruder"))
    yield Nodes(tmp, port, procs, pki, keys)
    for p in procs:
        p.kill()


#: FedSA-LoRA's clients keep B, so their models are measured on their own held-out examples.
PERSONAL = ["--personal-test-fraction", "0.3"]


def flwr_run(nodes: Nodes, overrides: str, out: Path) -> tuple[int, str]:
    """``flwr run .`` of the repository's app with ``--run-config overrides`` on a bare SuperLink (TLS,
    node authentication, the module's two node keys registered with ``flwr``) on the clients' port,
    followed to the end of the run in ``out``; ``(flwr run's exit code, its output)``."""
    import os
    import subprocess
    import sys

    from tests.server.deploy_helpers import Proc

    tmp, port, pki = nodes.tmp, nodes.port, nodes.pki
    home = tmp / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{port}"\nroot-certificates = "{pki["ca"]}"\n')
    env = dict(os.environ, FLWR_HOME=str(home))
    flwr = str(Path(sys.executable).parent / "flwr")
    wait_port_free(port, 30)  # an earlier SuperLink on the clients' port has gone
    link = Proc("flower-superlink", ["--ssl-certfile", str(pki["cert"]), "--ssl-keyfile", str(pki["key"]),
                                     "--ssl-ca-certfile", str(pki["ca"]), "--enable-supernode-auth",
                                     "--disable-runtime-dependency-installation", "--port", str(port)],
                tmp / "bare-superlink.log")
    try:
        wait_port_open(port, 60)  # the SuperLink is up (a fixed wait is too short on a busy machine)
        for _, pub in nodes.keys[:2]:
            got = subprocess.run([flwr, "supernode", "register", str(pub), "local"], env=env,
                                 capture_output=True, text=True, timeout=60)
            assert got.returncode == 0, got.stdout + got.stderr
        root = Path(__file__).resolve().parents[2]
        res = subprocess.run([flwr, "run", str(root), "local", "--run-config", f"{overrides} out='{out}'"],
                             env=env, capture_output=True, text=True, timeout=120)
        deadline = time.monotonic() + 240
        status = out / "status.json"
        while res.returncode == 0 and time.monotonic() < deadline and not (
                status.is_file() and json.loads(status.read_text())["state"] != "running"):
            time.sleep(0.5)
    finally:
        link.kill(15)
    return res.returncode, res.stdout + res.stderr


@pytest.fixture(scope="module")
def flora_runs(nodes, tiny_bert_dir, tiny_csv, tmp_path_factory):
    """FLoRA (the base folds every round) for 2 rounds: run by ``flwr run .`` of the repository's app
    on the module's clients, and the same job in fedlora-sim. ``(deployed out, simulator out, flwr
    run's exit code and output, the intruder's log)``."""
    from fedlora.simulations.cli import main as sim

    out, sim_out = nodes.tmp / "run-flora", tmp_path_factory.mktemp("sim-flora")
    overrides = (f"strategy='flora' rounds=2 model='{tiny_bert_dir}' data='{tiny_csv}' num-clients=2"
                 " local-steps=2 batch-size=4 max-length=16 rank=4 round-timeout=60.0")
    code, log = flwr_run(nodes, overrides, out)
    flags = ["--strategy", "flora", "--rounds", "2", *job(tiny_bert_dir, tiny_csv)]
    assert sim([*flags, "--quiet", "--out", str(sim_out)]) == 0
    return out, sim_out, code, log, nodes.procs[2].text()


def test_an_unregistered_node_never_trains(flora_runs, nodes):
    out, _, code, log, intruder = flora_runs
    # Assert: the run finished over TLS with the two registered nodes; the third was refused
    assert code == 0, log[-3000:]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert [r["clients"] for r in rows(out)[1:]] == [2, 2]
    assert "task completed" not in intruder and "Failed to activate SuperNode" in intruder
    assert "task completed" in nodes.procs[0].text()


def test_folding_strategy_runs_two_rounds_over_https(flora_runs):
    out, _, code, log, _ = flora_runs
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


def test_folding_strategy_over_https_matches_the_simulator(flora_runs):
    out, sim_out, code, log, _ = flora_runs
    assert code == 0, log[-3000:]
    # Assert: identical bytes up and down per client (the folds re-sent), the same adapter
    for s, d in zip(rows(sim_out), rows(out), strict=True):
        assert s["bytes_up_per_client"] == d["bytes_up_per_client"]
        assert s["bytes_down_per_client"] == d["bytes_down_per_client"]
    a, b = adapter_tensors(sim_out), adapter_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_dp_run_resumed_after_a_kill_gives_the_uninterrupted_adapter_and_ledgers(nodes, tiny_bert_dir,
                                                                                   tiny_csv):
    # Prepare: an uninterrupted 2-round run of FedSA-LoRA under sample-level DP (the server keeps the
    # global A, the clients keep their own B and their privacy ledgers: every side's state must
    # survive the kill; noise and batches keyed to the seed, so the two runs can be compared bit for bit)
    from fedlora.privacy.accounting import spent

    tmp, port = nodes.tmp, nodes.port
    args = [*nodes.secure, "--rounds", "2", "--strategy", "fedsa-lora", "--dp", "sample", "--epsilon", "1000",
            "--noise-multiplier", "1.0", "--delta", "1e-3", "--dp-reproducible",
            *job(tiny_bert_dir, tiny_csv), *PERSONAL, *WAIT]
    full = tmp / "full"
    wait_port_free(port, 30)  # the module's earlier SuperLink on the clients' port has gone
    assert server(tmp, port, full, *args, name="server-full").wait(300) == 0
    # Execute: the same run killed (SIGKILL, SuperLink included) after round 1, then resumed
    cut = tmp / "cut"
    wait_port_free(port, 30)
    srv = server(tmp, port, cut, *args, name="server-cut")
    try:
        wait_for_round(cut, 1, 300)  # a busy 2-core machine: the clients reconnect and reload
    finally:
        srv.kill()  # also when round 1 never came: no server left polling for the rest of the suite
    assert json.loads((cut / "status.json").read_text())["state"] == "running"
    wait_port_free(port, 30)
    resumed = server(tmp, port, cut, *nodes.secure, "--resume", str(cut), "--round-timeout", "60",
                     name="server-resumed")
    try:
        assert resumed.wait(300) == 0, resumed.text()[-3000:]
    finally:
        resumed.kill()
    # Assert: rounds 0..2 once each, and the same adapter and clients' own models as the
    # uninterrupted run (a redone round starts from the B each client kept before it)
    got = rows(cut)
    assert [r["round"] for r in got] == [0, 1, 2]
    for x, y in zip(rows(full)[1:], got[1:], strict=True):
        assert y["personal_accuracy"] == x["personal_accuracy"]
    a, b = adapter_tensors(full), adapter_tensors(cut)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # ... every round reports the ε spent, growing; each client's ledger continued across the
    # resumed run (a new Flower run, the same DP run id): 2 rounds × 2 local steps, 6 if the killed
    # server had started round 2 (a redone round is paid again); reported ε = the accountant's for
    # those steps at q = 4/50 (72 examples per client, 22 of them held out)
    assert [r["dp"] for r in got[1:]] == ["sample"] * 2 and got[1]["dp_backend"] == "opacus"
    assert 0 < got[1]["epsilon"] < got[2]["epsilon"]
    run_id = json.loads((cut / "config.json").read_text())["dp_run_id"]
    ledgers = sorted((tmp / "ledgers").glob(f"{run_id}-client*.json"))
    steps = [json.loads(p.read_text())["steps"] for p in ledgers]
    assert len(steps) == 2 and set(steps) <= {4, 6}
    assert got[2]["epsilon_per_client"] == [pytest.approx(spent(1.0, 4 / 50, s, 1e-3), abs=1e-3)
                                            for s in steps]


def test_flwr_run_of_the_repository_app(flora_runs):
    out, _, code, log, _ = flora_runs
    # Assert: `flwr run .` took the job from its run config; the ServerApp ran it and wrote its results
    assert code == 0, log[-3000:]
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert json.loads((out / "config.json").read_text())["strategy"] == "flora"
