"""The client's task loop survives a SuperNode that goes away in the middle of a task."""

from __future__ import annotations

import threading

import fedlora.clients.executor as executor


class _Control:
    """A runtime API that always has a task."""

    class _Res:
        token = "t"

        @staticmethod
        def HasField(name):  # noqa: N802 (protobuf's spelling)
            return name == "task"

    def AcquireTask(self, request):  # noqa: N802
        return self._Res()

    def close(self):
        pass


def test_a_task_lost_with_its_supernode_does_not_end_the_client(monkeypatch):
    # Prepare: the first task fails as when the SuperNode vanished ("no message for this task")
    stop, calls = threading.Event(), []

    def run_task(address, token, app):
        calls.append(token)
        if len(calls) == 1:
            raise RuntimeError("no message for this task")
        stop.set()
        return True

    monkeypatch.setattr(executor, "_runtime_client", lambda *a, **k: _Control())
    monkeypatch.setattr(executor, "run_task", run_task)
    # Act
    executor.serve("127.0.0.1:1", app=None, poll=0.01, stop=stop)
    # Assert: the loop went on to the next task
    assert calls == ["t", "t"]
