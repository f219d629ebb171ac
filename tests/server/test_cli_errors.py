"""fedlora-server and fedlora-client refuse bad input in one line, before starting anything."""

from __future__ import annotations

import socket

import pytest

from fedlora.clients.cli import main as client_main
from fedlora.errors import UserError
from fedlora.server.cli import main as server_main
from tests.server.deploy_helpers import make_node_key, make_pki


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.fixture()
def files(tmp_path):
    pki = make_pki(tmp_path)
    priv, pub = make_node_key(tmp_path, "node")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    return {**pki, "priv": priv, "pub": pub, "junk": junk}


def test_server_without_tls_or_insecure(capsys, tmp_path):
    err = one_line_error(capsys, server_main(["--out", str(tmp_path / "o")]))
    assert "--ssl-certfile, --ssl-keyfile and --ssl-ca-certfile" in err and "--insecure" in err


def test_server_bad_certificate_file(capsys, files, tmp_path):
    code = server_main(["--ssl-certfile", str(files["junk"]), "--ssl-keyfile", str(files["key"]),
                        "--ssl-ca-certfile", str(files["ca"]), "--out", str(tmp_path / "o")])
    assert "is not a PEM certificate" in one_line_error(capsys, code)


def test_server_missing_key_file(capsys, files, tmp_path):
    code = server_main(["--ssl-certfile", str(files["cert"]), "--ssl-keyfile", str(tmp_path / "nope"),
                        "--ssl-ca-certfile", str(files["ca"]), "--out", str(tmp_path / "o")])
    assert "file not found" in one_line_error(capsys, code)


def test_server_auth_needs_tls_and_real_public_keys(capsys, files, tmp_path):
    code = server_main(["--insecure", "--auth-keys", str(files["pub"]), "--out", str(tmp_path / "o")])
    assert "--auth-keys needs TLS" in one_line_error(capsys, code)
    code = server_main(["--ssl-certfile", str(files["cert"]), "--ssl-keyfile", str(files["key"]),
                        "--ssl-ca-certfile", str(files["ca"]), "--auth-keys", str(files["junk"]),
                        "--out", str(tmp_path / "o")])
    assert "not an OpenSSH EC public key" in one_line_error(capsys, code)


@pytest.mark.parametrize("extra, words", [
    (["--strategy", "flora", "--norm-bound", "2"], "norm bounding can only run on a sum-only strategy"),
    (["--max-examples", "-5"], "--max-examples must be ≥ 1 (0: no cap), got -5"),
])
def test_server_refuses_a_defence_its_strategy_cannot_take(capsys, tmp_path, extra, words):
    code = server_main(["--insecure", "--out", str(tmp_path / "o"), *extra])
    assert words in one_line_error(capsys, code)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value", [("--round-timeout", "0"), ("--round-timeout", "-5"),
                                         ("--round-timeout", "nan"), ("--round-timeout", "inf"),
                                         ("--max-update-norm", "0"), ("--max-update-norm", "nan")])
def test_server_round_settings_that_are_not_a_positive_number_are_refused(capsys, tmp_path, monkeypatch,
                                                                           flag, value):
    # they were taken: every round timed out, or every upload was rejected (NaN: none was)
    monkeypatch.setattr("fedlora.server.cli.serve", lambda *a: 0)
    code = server_main(["--insecure", "--out", str(tmp_path / "o"), flag, value])
    off = " (a cap no update reaches, e.g. 1e30, turns it off)" if "norm" in flag else ""
    want = f"{flag} must be a finite number > 0, got {float(value)}{off}"
    assert one_line_error(capsys, code).endswith(want)


def test_server_port_in_use(capsys, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = server_main(["--insecure", "--port", str(port), "--out", str(tmp_path / "o")])
    assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(capsys, code)


def test_server_keeps_existing_results_and_needs_a_checkpoint_to_resume(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert "already has results" in one_line_error(capsys, server_main(["--insecure", "--out", str(out)]))
    assert (out / "metrics.jsonl").read_text() == "{}\n"
    code = server_main(["--insecure", "--resume", str(out)])
    assert "no checkpoint.safetensors" in one_line_error(capsys, code)


@pytest.mark.parametrize("text, words", [
    ("{", "config.json' cannot be read as JSON (Expecting property name"),  # json's traceback
    ("[1]", "config.json' holds no job's settings (got list): restore the run's config.json"),  # TypeError
    ('{"rounds": "x"}', "config.json': rounds must be an integer, got 'x'"),  # TypeError from a check
    ('{"strategy": "nope"}', "config.json': strategy must be one of fed-sb, fedavg,"),  # KeyError
])
def test_resume_over_a_damaged_config_json_is_one_line_and_keeps_the_run(capsys, tmp_path, text, words):
    # Prepare: a stopped run whose config.json was damaged
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"kept")
    (out / "config.json").write_text(text)
    # Execute / Assert
    assert words in one_line_error(capsys, server_main(["--insecure", "--resume", str(out)]))
    assert (out / "checkpoint.safetensors").read_bytes() == b"kept"


@pytest.mark.parametrize("argv, words", [
    (["--server", "localhost", "--insecure", "--partition-id", "0", "--num-partitions", "2"],
     "not HOST:PORT"),
    (["--server", "127.0.0.1:8000", "--insecure"], "either --data FILE or --partition-id"),
    (["--server", "127.0.0.1:8000", "--insecure", "--partition-id", "2", "--num-partitions", "2"],
     "--partition-id must be in 0..1"),
    (["--server", "127.0.0.1:8000", "--partition-id", "0", "--num-partitions", "2"],
     "--root-certificates CA.pem for TLS, or --insecure"),
    (["--server", "127.0.0.1:8000", "--insecure", "--data", "/no/such.csv", "--client-id", "1"],
     "file not found"),
    # two --data clients would both have been client 0, and the server kept one of them
    (["--server", "127.0.0.1:8000", "--insecure", "--data", __file__], "--data needs --client-id K"),
    (["--server", "127.0.0.1:8000", "--insecure", "--partition-id", "0", "--num-partitions", "2",
      "--client-id", "-1"], "--client-id must be ≥ 0, got -1"),
    # these were taken: the SuperNode, restarted again and again, failed on them (or backed off forever)
    (["--server", "127.0.0.1:8000", "--insecure", "--partition-id", "0", "--num-partitions", "2",
      "--poll", "nan"], "--poll must be a finite number of seconds > 0, got nan"),
    (["--server", "127.0.0.1:8000", "--insecure", "--partition-id", "0", "--num-partitions", "2",
      "--poll", "inf"], "--poll must be a finite number of seconds > 0, got inf"),
    (["--server", "127.0.0.1:8000", "--insecure", "--partition-id", "0", "--num-partitions", "2",
      "--runtime-port", "70000"], "--runtime-port 70000 is not a TCP port (1-65535)"),
])
def test_client_bad_arguments(capsys, argv, words):
    assert words in one_line_error(capsys, client_main(argv))


def test_client_data_as_a_pattern_or_a_cached_hub_id_reaches_the_clientapp_as_this_machine_finds_it(
        tmp_path, monkeypatch, capsys):
    # Prepare: two shards, and an HF cache holding a dataset with one train file
    from fedlora.clients.cli import build_parser, check_args, node_config

    for i in range(2):
        (tmp_path / f"part-{i}.csv").write_text("text,label\na,0\n")
    snapshot = tmp_path / "cache" / "datasets--org--toy" / "snapshots" / "c0"
    snapshot.mkdir(parents=True)
    blob = tmp_path / "cache" / "datasets--org--toy" / "blobs" / "3727f3"  # as the hub's cache keeps it
    blob.parent.mkdir()
    blob.write_text('{"text": "a", "label": 0}\n')
    (snapshot / "train.jsonl").symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    base = ["--server", "127.0.0.1:8000", "--insecure", "--client-id", "0", "--data"]
    # Execute / Assert: each passes the checks and reaches the node config as a local path, its link
    # kept (the blob it resolved to has no suffix: the ClientApp refused it every round)
    cases = ((str(tmp_path / "part-*.csv"), tmp_path / "part-*.csv"), ("org/toy", snapshot / "train.jsonl"))
    for data, want in cases:
        args = build_parser().parse_args([*base, data])
        check_args(args)
        assert f"data={str(want)!r}" in node_config(args)
    (tmp_path / "mk.py").write_text("print()\n")  # a form no reader reads: refused at start
    script = one_line_error(capsys, client_main([*base, str(tmp_path / "mk.py")]))
    assert "--data: unsupported data file" in script
    absent = one_line_error(capsys, client_main([*base, "org/absent"]))
    assert "fetch it once with `hf download org/absent" in absent
    assert "file not found" in one_line_error(capsys, client_main([*base, str(tmp_path / "none-*.csv")]))


def test_client_bad_certificate_and_key(capsys, files):
    base = ["--server", "127.0.0.1:8000", "--partition-id", "0", "--num-partitions", "1"]
    code = client_main([*base, "--root-certificates", str(files["junk"])])
    assert "is not a PEM certificate" in one_line_error(capsys, code)
    code = client_main([*base, "--root-certificates", str(files["ca"]), "--auth-key", str(files["junk"])])
    assert "not an unencrypted PEM or OpenSSH private key" in one_line_error(capsys, code)
    code = client_main([*base, "--insecure", "--auth-key", str(files["priv"])])
    assert "--auth-key needs TLS" in one_line_error(capsys, code)


@pytest.mark.parametrize("extra, words", [
    (["--text-column", "nope"], "text column 'nope' is not in"),
    (["--max-length", "1000"], "--max-length 1000 exceeds the 64 positions"),
])
def test_a_refused_job_leaves_the_runs_it_would_overwrite(capsys, tmp_path, tiny_bert_dir, tiny_csv, extra,
                                                         words):
    # Prepare: a finished run's files; the job's data and model are read in its ServerApp, after the
    # launch had cleared them (--overwrite)
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "checkpoint.safetensors").write_bytes(b"old")
    argv = ["--insecure", "--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--out", str(out),
            "--overwrite", *extra]
    # Execute / Assert: one line before anything starts, and the old run untouched
    assert words in one_line_error(capsys, server_main(argv))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "metrics.jsonl"]
    assert (out / "checkpoint.safetensors").read_bytes() == b"old"


def test_flags_beside_resume_change_what_a_resumed_run_may_change_and_no_more(capsys, tmp_path):
    import json
    from dataclasses import asdict

    from fedlora.job.configfile import parse_args
    from fedlora.job.schema import JobConfig
    from fedlora.rounds.checkpoint import save_checkpoint
    from fedlora.server.cli import build_parser, job_for

    # Prepare: a stopped one-round run (of its checkpoint only the data's digests are read here: none)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(asdict(JobConfig(rounds=1, lr=0.01))))
    save_checkpoint(run, {"round": 1, "data": {}})
    def parse(argv):
        return parse_args(build_parser(), argv)

    # Execute / Assert: --rounds grows the run (it was silently ignored); the stopped job's own value
    # and the same flags again are no change; --lr is refused in one line
    cfg, out = job_for(parse(["--insecure", "--resume", str(run), "--rounds", "3"]))
    assert (cfg.rounds, cfg.lr, out) == (3, 0.01, run)
    assert job_for(parse(["--insecure", "--resume", str(run), "--lr", "0.01"]))[0].rounds == 1
    code = server_main(["--insecure", "--resume", str(run), "--lr", "0.5"])
    assert "its --lr cannot change (only --rounds" in one_line_error(capsys, code)
    code = server_main(["--insecure", "--resume", str(run), "--out", str(tmp_path / "other")])
    assert "writes its results there, not to --out" in one_line_error(capsys, code)
    code = server_main(["--insecure", "--resume", str(run), "--overwrite"])  # it did nothing
    assert "continues the stopped run there and --overwrite replaces" in one_line_error(capsys, code)
    # a DP run's σ was set for its rounds: it cannot grow (its ε would be spent over again)
    private = tmp_path / "private"
    private.mkdir()
    (private / "config.json").write_text(json.dumps(asdict(JobConfig(rounds=1, lr=0.01, dp="client",
                                                                     epsilon=8.0, delta=1e-3))))
    save_checkpoint(private, {"round": 1, "data": {}})
    code = server_main(["--insecure", "--resume", str(private), "--rounds", "3"])
    assert "its 1 round spend ε = 8 (--dp client); it cannot go to 3 rounds" in one_line_error(capsys, code)
    # data that changed since the checkpoint recorded its digest
    data = tmp_path / "data.csv"
    data.write_text("text,label\nsome text,a\n")
    (run / "config.json").write_text(json.dumps(asdict(JobConfig(rounds=1, lr=0.01, data=str(data)))))
    save_checkpoint(run, {"round": 1, "data": {"data": "0" * 64}})
    code = server_main(["--insecure", "--resume", str(run)])
    assert f"--data {str(data)!r} has changed since the stopped run read it" in one_line_error(capsys, code)


def test_a_partition_of_other_shares_than_the_jobs_is_refused(tiny_csv):
    from fedlora.job.schema import JobConfig
    from fedlora.job.setup import client_share

    cfg = JobConfig(data=str(tiny_csv), num_clients=3)
    assert len(client_share(cfg, 0, 3)) > 0
    with pytest.raises(UserError, match="--num-partitions 2 differs from the server's --num-clients 3"):
        client_share(cfg, 0, 2)  # a third of the data was held by no client, silently


def test_a_second_server_on_a_folder_a_serverapp_writes_is_refused_and_removes_nothing(tmp_path):
    import fcntl

    from fedlora.server.launch import check_not_written

    (tmp_path / "status.json").write_text('{"state": "running"}\n')
    check_not_written(tmp_path)  # no ServerApp: nothing held
    with (tmp_path / ".lock").open("a") as held:  # as the running ServerApp holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another fedlora-server is writing to"):
            check_not_written(tmp_path)  # its server hung for ever once its status.json was gone
    assert (tmp_path / "status.json").read_text() == '{"state": "running"}\n'


def test_a_clients_refusal_says_which_flags_are_the_servers():
    from fedlora.clients.app import server_flags

    got = server_flags("text column 'text' is not in a.csv; pass --text-column sentence")
    assert got == " (--text-column: set on fedlora-server)"  # fedlora-client has no such flag
    assert server_flags("--data 'x.csv': file not found") == ""


def test_a_clients_transport_flags_that_do_not_fit_the_server_get_a_hint(tmp_path):
    import http.server
    import ssl
    import threading

    from fedlora.net.tls import free_port, transport_hint

    # Prepare: a TLS server with a certificate of one CA, and a plain HTTP server (a SuperLink without
    # TLS answers HTTP/1.1)
    (tmp_path / "pki").mkdir()
    (tmp_path / "other").mkdir()
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["cert"], pki["key"])
    tls_port, listener = free_port(), socket.socket()
    listener.bind(("127.0.0.1", tls_port))
    listener.listen()

    def serve_tls():
        while True:
            conn, _ = listener.accept()
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()  # plain bytes: closed without an answer, as a TLS SuperLink does

    threading.Thread(target=serve_tls, daemon=True).start()
    plain = http.server.HTTPServer(("127.0.0.1", free_port()), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    http_port = plain.server_address[1]
    # Execute / Assert: the SuperNode had retried with "Server disconnected" alone
    assert "speaks TLS: pass --root-certificates" in transport_hint("127.0.0.1", tls_port, None)
    assert "speaks plain HTTP (no TLS): pass --insecure" in transport_hint("127.0.0.1", http_port, pki["ca"])
    assert "does not verify" in transport_hint("127.0.0.1", tls_port, other["ca"])
    assert transport_hint("127.0.0.1", tls_port, pki["ca"]) is None       # as the flags say
    assert transport_hint("127.0.0.1", http_port, None) is None
    assert transport_hint("127.0.0.1", free_port(), None) is None         # not up yet: no hint
    plain.shutdown()


def test_a_supernode_that_gives_up_is_diagnosed_before_it_is_restarted():
    import sys
    import threading

    from fedlora.clients.cli import supervise

    stop, calls = threading.Event(), []

    def diagnose():  # a server started after its client: checked again when the SuperNode gives up
        calls.append(1)
        stop.set()

    supervise([sys.executable, "-c", "raise SystemExit(3)", "--superlink", "127.0.0.1:1"], {}, stop, diagnose)
    assert calls == [1]
