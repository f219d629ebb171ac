"""What a deployed client says of the job the server sent it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.app import Context, RecordDict

from fedlora.clients import app as client_module
from fedlora.job.runconfig import to_run_config
from fedlora.job.schema import JobConfig


class _Built(Exception):
    """The client's model would be built now: its job was checked."""


def test_a_client_leaves_the_servers_unread_flags_to_the_server(monkeypatch, capsys):
    # Prepare: a job with --epsilon and no --dp, which fedlora-server warns about once at start; each
    # fedlora-client said it again, naming a flag its operator never gave
    def built(*args, **kwargs):
        raise _Built

    monkeypatch.setattr(client_module, "LocalClient", built)
    client_module._CACHE.clear()
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=to_run_config(JobConfig(epsilon=4.0)))
    msg = SimpleNamespace(content={"config": {"label-names": ["a", "b"]}})
    # Act
    with pytest.raises(_Built):
        client_module.local_client(msg, context)
    # Assert
    assert "is not used" not in capsys.readouterr().err
