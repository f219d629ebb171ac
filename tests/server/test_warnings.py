"""The warnings fedlora prints in the ServerApp reach fedlora-server's output, once."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

from fedlora.errors import SAID


def test_the_notes_fedlora_says_reach_a_listener_as_the_serverapps_log(caplog, capsys):
    from fedlora.errors import LISTENERS, listening, say
    from fedlora.tasks.sft import warn_cut

    # Prepare: the ServerApp's stderr reaches no terminal; a test set's prompts cut to --max-length
    # (warn_cut) were said by fedlora-sim and by no deployment
    log = logging.getLogger("fedlora.server")
    # Act: the ServerApp listens while it runs (its main: with listening(log.warning))
    with caplog.at_level(logging.WARNING, logger="fedlora.server"), listening(log.warning):
        warn_cut(20, 20, "multiple-choice prompts", 64, kept="choices")
    say("said after the run")
    # Assert: the note is a warning of the log (OUT/server.log), and still printed on stderr
    assert [r.getMessage() for r in caplog.records] == [
        "20 of 20 multiple-choice prompts exceed --max-length 64; their prompts were cut from the left"
        " (choices kept)"]
    assert capsys.readouterr().err.count("fedlora: 20 of 20 multiple-choice prompts exceed") == 1
    assert LISTENERS == []


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
