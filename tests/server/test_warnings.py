"""The warnings fedlora prints in the ServerApp reach fedlora-server's output, once."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

from fedlora.errors import SAID


def test_the_serverapps_printed_warnings_are_logged(caplog):
    from fedlora.server.app import WarningsToLog

    # Prepare: the ServerApp's stderr reaches no terminal; a test set's prompts cut to --max-length
    # (fedlora.tasks.sft.warn_cut) were said by fedlora-sim and by no deployment
    stream = io.StringIO()
    err = WarningsToLog(stream)
    # Act
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        err.write("fedlora: 20 of 20 multiple-choice prompts exceed")
        err.write(" --max-length 64\nsome library's note\n")
    # Assert: the fedlora line is a warning of the log (OUT/server.log), and all goes on to stderr
    line = "20 of 20 multiple-choice prompts exceed --max-length 64"
    assert [r.getMessage() for r in caplog.records] == [line]
    assert stream.getvalue() == f"fedlora: {line}\nsome library's note\n"


def test_the_server_relays_the_logs_warnings_but_those_it_said_itself(tmp_path):
    from fedlora.server.launch import LogTail, follow

    # Prepare: fedlora-server checked the job before starting it (--epsilon without --dp, said), and
    # the ServerApp checks it again, into its log, beside a warning of its own
    tail = LogTail(tmp_path / "server.log")
    SAID.add("--epsilon 4.0 is not used")
    (tmp_path / "server.log").write_text("2026-12-05 19:00:00,000 WARNING --epsilon 4.0 is not used\n"
                                         "2026-12-05 19:00:01,000 WARNING 20 of 20 prompts exceed\n")
    (tmp_path / "status.json").write_text(json.dumps({"run_id": "1", "state": "finished"}))
    link = SimpleNamespace(proc=SimpleNamespace(poll=lambda: None))
    notes = []
    # Act
    follow(tmp_path, link, lambda row: None, 1, on_note=notes.append, log=tail)
    # Assert
    assert notes == ["20 of 20 prompts exceed"]


def test_lines_written_by_two_threads_at_once_are_logged_whole(caplog):
    import threading

    from fedlora.server.app import WarningsToLog

    # Prepare: Flower's simulation runs the ServerApp in a thread, beside Ray's, which prints its
    # workers' lines on the same stderr; print() writes a line, then its newline
    err = WarningsToLog(io.StringIO())
    halfway, other_done = threading.Event(), threading.Event()

    def server() -> None:
        err.write("fedlora: 20 of 20 prompts exceed")
        halfway.set()
        other_done.wait(5)
        err.write(" --max-length 64\n")

    # Act
    with caplog.at_level(logging.WARNING, logger="fedlora.server"):
        thread = threading.Thread(target=server)
        thread.start()
        halfway.wait(5)
        err.write("(ClientAppActor pid=7) a worker's line\n")
        other_done.set()
        thread.join(5)
    # Assert: the server thread's line, whole; the other thread's line not folded into it
    assert [r.getMessage() for r in caplog.records] == ["20 of 20 prompts exceed --max-length 64"]
