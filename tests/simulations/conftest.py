"""Fixtures of the simulator's tests: a run stopped as Ctrl-C stops it, for the resume tests."""

from __future__ import annotations

import pytest

from fedlora.rounds import sink


@pytest.fixture
def stop_after_round(monkeypatch):
    """``stop_after_round(n)``: every run of the test stops (``KeyboardInterrupt``, as Ctrl-C) once
    round ``n`` is committed to its folder; ``stop_after_round(None)``: runs go on again."""
    commit = sink.RunFolder.commit

    def stop(n: int | None) -> None:
        def commit_then_stop(self, row, coord):
            commit(self, row, coord)
            if row["round"] == n:
                raise KeyboardInterrupt

        monkeypatch.setattr(sink.RunFolder, "commit", commit if n is None else commit_then_stop)

    return stop
