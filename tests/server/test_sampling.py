"""One sampling rule: a deployment trains the clients ``fedlora-sim`` samples, by client id.

The real ServerApp and ClientApp run in one process over :class:`LocalGrid`, whose node ids are
not the clients' ids (as on a SuperLink, which numbers nodes by itself): the server learns which
client each node is before its first round.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
from flwr.app import Context, RecordDict

from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.server.app import run_server
from fedlora.simulations.engine import run
from tests.server.local_grid import LocalGrid, assert_same_adapter, deployment_run_config, rows


def test_a_deployment_trains_the_clients_the_simulator_samples(tiny_bert_dir, tiny_csv, tmp_path,
                                                               monkeypatch):
    # Prepare: FLoRA (a client that missed a round's fold must be sent it), 3 of 6 clients a round;
    # six nodes numbered 105, 104, ..., 100 for clients 0..5
    monkeypatch.setenv("FEDLORA_LEDGER_DIR", str(tmp_path / "ledgers"))
    cfg = JobConfig(model=str(tiny_bert_dir), data=str(tiny_csv), strategy="flora", num_clients=6,
                    clients_per_round=3, rounds=3, local_steps=2, batch_size=4, max_length=16, rank=4)
    grid = LocalGrid(deployment_run_config(cfg, tmp_path / "deployed"), 6)
    grid.contexts = {105 - k: ctx for k, ctx in grid.contexts.items()}
    # Execute
    simulated = run(cfg, tmp_path / "sim")
    run_server(grid, deployment_run_config(cfg, tmp_path / "deployed"))
    deployed = rows(tmp_path / "deployed")
    # Assert: the same 3 clients each round, those of (seed, round), not the same 3 every round
    drawn = [cfg.sampled(r) for r in (1, 2, 3)]
    assert [r["client_ids"] for r in deployed[1:]] == [r["client_ids"] for r in simulated[1:]] == drawn
    assert len({tuple(d) for d in drawn}) > 1 and all(len(d) == 3 for d in drawn)
    # ... the nodes that trained were those clients' nodes
    trained = {(m.metadata.src_node_id, m.content["metrics"]["client-id"]) for m in grid.seen
               if "upload" in m.content.array_records}
    assert trained == {(105 - c, c) for d in drawn for c in d}
    # ... billed the same (a client that missed folds is sent them), and the same adapter
    for s, d in zip(simulated, deployed, strict=True):
        assert s["bytes_up_per_client"] == d["bytes_up_per_client"]
        assert s["bytes_down_per_client"] == d["bytes_down_per_client"]
    assert_same_adapter(tmp_path / "sim", tmp_path / "deployed", rtol=1e-5, atol=1e-6)


def three_nodes_two_rounds(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, identify_timeout: float,
                           round_timeout: float) -> dict:
    """The run config of a 3-client, 2-round job into ``tmp_path/out``, with the server's identify
    timeout set to ``identify_timeout`` seconds."""
    import fedlora.server.flower_transport as transport

    monkeypatch.setenv("FEDLORA_LEDGER_DIR", str(tmp_path / "ledgers"))
    monkeypatch.setattr(transport, "IDENTIFY_TIMEOUT", identify_timeout)
    cfg = JobConfig(model=str(tiny_bert_dir), data=str(tiny_csv), num_clients=3, rounds=2, local_steps=1,
                    batch_size=4, max_length=16, rank=4)
    return deployment_run_config(cfg, tmp_path / "out", round_timeout=round_timeout)


def test_a_node_that_does_not_say_who_it_is_is_left_out_and_asked_once_a_round(tiny_bert_dir, tiny_csv,
                                                                                tmp_path, monkeypatch):
    # Prepare: 3 nodes; node 2 never answers the server's identify query (an old or foreign client)
    rc = three_nodes_two_rounds(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, identify_timeout=0.5,
                                round_timeout=2.0)
    asked = []

    class Grid(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            asked.extend(m.metadata.dst_node_id for m in messages if m.metadata.group_id == "identify")
            return super().push_messages([m for m in messages if not (
                m.metadata.dst_node_id == 2 and m.metadata.group_id == "identify")])

    # Execute
    run_server(Grid(rc, 3), rc)
    # Assert: both rounds trained the two clients that identified themselves; node 2 was asked once
    # in each round, not at every poll of the round's wait
    got = rows(tmp_path / "out")
    assert [r["client_ids"] for r in got[1:]] == [[0, 1], [0, 1]]
    assert asked.count(2) == 2 and asked.count(0) == asked.count(1) == 1


def test_a_node_that_answers_after_the_identify_timeout_trains_in_the_same_round(tiny_bert_dir, tiny_csv,
                                                                                 tmp_path, monkeypatch):
    # Prepare: 3 nodes; node 2's identify reply is held back for the first 8 pulls that ask for it,
    # past the 0.05 s identify timeout (a ClientApp still loading its model, Ray actors still
    # starting: Flower's engine stalled on 2-core CI until its round timeout this way)
    rc = three_nodes_two_rounds(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, identify_timeout=0.05,
                                round_timeout=30.0)
    asked, held = [], {}

    class Grid(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            ids = super().push_messages(messages)
            for mid, m in zip(ids, messages, strict=True):
                if m.metadata.group_id == "identify":
                    asked.append(m.metadata.dst_node_id)
                    if m.metadata.dst_node_id == 2:
                        held[mid] = 8
            return ids

        def pull_messages(self, ids):
            ids = list(ids)
            for mid in [i for i in ids if held.get(i, 0) > 0]:
                held[mid] -= 1
            return super().pull_messages([i for i in ids if held.get(i, 0) == 0])

    # Execute
    run_server(Grid(rc, 3), rc)
    # Assert: round 1 trained all three clients (node 2 was not left out until the round timeout),
    # each node was asked once, and the late reply was the one that counted
    got = rows(tmp_path / "out")
    assert [r["client_ids"] for r in got[1:]] == [[0, 1, 2], [0, 1, 2]]
    assert sorted(asked) == [0, 1, 2] and list(held.values()) == [0]


def test_a_second_live_node_with_a_clients_id_is_left_out_with_a_warning_on_the_servers_output(
        tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, caplog):
    # Prepare: 2 clients' job; nodes 0 and 1 are clients 0 and 1, node 2 says it is client 0 too
    # (two fedlora-client --data without --client-id were both client 0)
    rc = three_nodes_two_rounds(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, identify_timeout=5.0,
                                round_timeout=10.0)
    rc["num-clients"], rc["rounds"] = 2, 1
    grid = LocalGrid(rc, 3)
    for node, part in ((0, 0), (1, 1), (2, 0)):
        grid.contexts[node].node_config = {"partition-id": part, "num-partitions": 2}
    # Execute
    run_server(grid, rc)
    # Assert: clients 0 and 1 trained, client 0 on the node identified first (nodes 0 and 2 answer
    # one query, in no set order; the later one had replaced it as a "restart"), and the server's
    # log, which fedlora-server prints, says why the other was left out
    assert rows(tmp_path / "out")[-1]["client_ids"] == [0, 1]
    trained = {m.metadata.src_node_id for m in grid.seen if "upload" in m.content.array_records}
    (kept,) = trained - {1}
    assert 1 in trained and kept in (0, 2)
    log = (tmp_path / "out" / "server.log").read_text()
    assert f"WARNING node {2 - kept} says it is client 0, which node {kept} is: left out" in log
    # ... and the left-out node's own output (its ClientApp's log, which fedlora-client prints) too
    said = [r.getMessage() for r in caplog.records if r.name == "fedlora.client"]
    assert said == ["fedlora-client: error: this node says it is client 0, which another live node already"
                    " is, so the server leaves it out of every round: give each fedlora-client its own"
                    " --client-id (or --partition-id)"]


def test_a_clients_refusal_is_one_line_on_both_sides(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    from fedlora.server.launch import LogTail

    # Prepare: client 1's shares are not the job's (--num-partitions 3 for a 2-client job)
    rc = three_nodes_two_rounds(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, identify_timeout=5.0,
                                round_timeout=10.0)
    rc["num-clients"], rc["rounds"] = 2, 1
    grid = LocalGrid(rc, 2)
    grid.contexts[1].node_config = {"partition-id": 1, "num-partitions": 3}
    (tmp_path / "out").mkdir()
    earlier = "2026-01-01 00:00:00,000 WARNING an earlier run's warning\n"
    (tmp_path / "out" / "server.log").write_text(earlier)  # a run this one replaces (--overwrite)
    tail = LogTail(tmp_path / "out" / "server.log")
    # a job that is refused at set-up keeps the earlier run's log (as its results)
    with pytest.raises(UserError):
        run_server(grid, {**rc, "lr": -1.0})
    assert (tmp_path / "out" / "server.log").read_text().startswith(earlier)
    # Execute
    run_server(grid, rc)
    # Assert: the round went on with client 0; client 1's reply is an error whose reason is the
    # refusal's line (it was a traceback), and fedlora-server's output gets it from the log
    assert rows(tmp_path / "out")[-1]["client_ids"] == [0]
    (reason,) = [m.error.reason for m in grid.seen if m.has_error()]
    assert reason.startswith("refused: --num-partitions 3 differs from the server's --num-clients 2")
    notes = tail.notes()
    assert any("client 1" in n and "--num-partitions 3 differs" in n for n in notes)
    assert all("\n" not in n for n in notes)
    # the log is this run's alone (the earlier run's lines went with its results; they were appended)
    log = (tmp_path / "out" / "server.log").read_text()
    assert "earlier run" not in log and "--num-partitions 3" in log
    assert not any("earlier run" in n for n in notes)


class RestartingGrid(LocalGrid):
    """Node 1 (client 1) dies when round ``rnd``'s training reaches it, still listed as the SuperLink
    lists a dead node until its heartbeat expires; its restarted client joins as node 7."""

    def __init__(self, run_config: dict, n: int, rnd: int) -> None:
        super().__init__(run_config, n)
        self.rnd, self.gone = rnd, False

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            round_of = msg.content.config_records.get("config", {}).get("round")
            dies = msg.metadata.message_type == "train" and round_of == self.rnd
            if msg.metadata.dst_node_id == 1 and (self.gone or dies):
                if not self.gone:  # the restart: a new node, the same client (its node config)
                    self.gone, old = True, self.contexts[1]
                    self.contexts[7] = Context(run_id=1, node_id=7, node_config=dict(old.node_config),
                                               state=RecordDict(), run_config=old.run_config)
                ids.append(f"lost-{id(msg)}")  # sent; no reply, ever
                continue
            ids += super().push_messages([msg])
        return ids


def test_a_client_restarted_before_its_round_gets_it_on_its_new_node(tiny_bert_dir, tiny_csv, tmp_path,
                                                                     monkeypatch):
    # Prepare: 2 clients, 2 rounds; client 1's node dies as round 2 is sent to it
    rc = three_nodes_two_rounds(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, identify_timeout=2.0,
                                round_timeout=2.0)
    rc["num-clients"] = 2
    grid = RestartingGrid(rc, 2, rnd=2)
    # Execute
    run_server(grid, rc)
    # Assert: round 2 has both clients (client 1's round went to its dead node, and was lost), the
    # second on node 7, billed both sends
    got = rows(tmp_path / "out")
    assert [r["client_ids"] for r in got[1:]] == [[0, 1], [0, 1]] and got[2]["failed"] == 0
    trained = {(m.metadata.src_node_id, m.content["metrics"]["client-id"]) for m in grid.seen
               if "upload" in m.content.array_records}
    assert (7, 1) in trained and (1, 1) in trained  # round 1 on node 1, round 2 on node 7
    assert got[2]["bytes_down_per_client"][1] > got[2]["bytes_down_per_client"][0]


@contextlib.contextmanager
def earlier_log(tmp_path):
    """``(path, tail, start, handler, logger)``: an earlier run's ``server.log``, fedlora-server's tail of
    it, the offset the new ServerApp starts at, and its handler on a logger of its own."""
    from fedlora.server.launch import LogTail

    path = tmp_path / "server.log"
    path.write_text("2026-01-01 00:00:00,000 WARNING an earlier run's warning\n")
    tail, start = LogTail(path), path.stat().st_size
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger(f"tests.restart_log.{tmp_path.name}")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield path, tail, start, handler, logger
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_a_fresh_runs_log_replaces_the_earlier_one_and_each_line_is_shown_once(tmp_path):
    from fedlora.server.launch import restart_log

    # Prepare: an earlier run's log; fedlora-server's tail of it; the new ServerApp's handler
    with earlier_log(tmp_path) as (path, tail, start, handler, logger):
        logger.warning("a set-up warning")
        assert tail.notes() == ["a set-up warning"]
        # Execute: the job is set up: the log becomes this run's alone
        restart_log(handler, start)
        logger.warning("a round's warning")
        # Assert: nothing shown twice, the earlier run's lines gone, this run's kept
        assert tail.notes() == ["a round's warning"]
        text = path.read_text()
        assert "earlier" not in text and text.count("a set-up warning") == 1 and "round's" in text


def test_a_log_replaced_as_the_tail_opens_it_is_read_from_the_new_files_start(tmp_path, monkeypatch):
    from pathlib import Path

    from fedlora.server.launch import restart_log

    # Prepare: an earlier run's log and fedlora-server's tail of it; the new run's set-up warning
    with earlier_log(tmp_path) as (path, tail, start, handler, logger):
        opened, real_open = [], Path.open

        def replaced_first(self, *args, **kwargs):  # the ServerApp replaces the log as the tail opens it
            if self == path and not opened:
                opened.append(self)
                restart_log(handler, start)
            return real_open(self, *args, **kwargs)

        logger.warning("a set-up warning")
        monkeypatch.setattr(Path, "open", replaced_first)
        # Execute / Assert: the new file is read from its start (its first line is not cut or lost)
        assert tail.notes() == ["a set-up warning"] and opened
        logger.warning("a round's warning")
        assert tail.notes() == ["a round's warning"]


class EditingGrid(LocalGrid):
    """Node 0 trains on its own --data file, which is edited, and its client restarted, as round
    ``rnd``'s training reaches it."""

    def __init__(self, run_config: dict, n: int, rnd: int, own) -> None:
        super().__init__(run_config, n)
        self.rnd, self.own = rnd, own
        self.contexts[0].node_config = {"client-id": 0, "data": str(own)}

    def push_messages(self, messages):
        for msg in messages:
            round_of = msg.content.config_records.get("config", {}).get("round")
            train = msg.metadata.message_type == "train"
            if msg.metadata.dst_node_id == 0 and train and round_of == self.rnd:
                self.own.write_text("".join(self.own.read_text().splitlines(keepends=True)[:-3]))
                self.clients.pop(0, None)  # its process restarted: the file is read again
        return super().push_messages(messages)


def test_a_client_restarted_on_edited_data_is_left_out(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    from fedlora.rounds.checkpoint import load_checkpoint

    # Prepare: 2 clients, 2 rounds; client 0 trains on its own copy of the data, edited before round 2
    rc = three_nodes_two_rounds(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch, identify_timeout=5.0,
                                round_timeout=10.0)
    rc["num-clients"] = 2
    own = tmp_path / "own.csv"
    own.write_text(tiny_csv.read_text())
    grid = EditingGrid(rc, 2, rnd=2, own=own)
    # Execute
    run_server(grid, rc)
    # Assert: round 2 went on without client 0 (its share of the job had changed; it trained on), the
    # server's log says why, and the checkpoint keeps the digest, for a resumed run to hold it to
    got = rows(tmp_path / "out")
    assert [r["client_ids"] for r in got[1:]] == [[0, 1], [1]]
    log = (tmp_path / "out" / "server.log").read_text()
    assert "client 0's --data is not the file it trained on earlier in this run" in log
    assert list(load_checkpoint(tmp_path / "out", keys=("client_data",))["client_data"]) == ["0"]
