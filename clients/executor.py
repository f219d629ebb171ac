"""Run the ClientApp's tasks inside this (long-lived) process: the model stays warm.

Flower's SuperNode, in ``--isolation process`` mode, queues each received message
as a task on its local Runtime API and waits for an executor to take it. Stock
Flower's executor (``flower-superexec``) starts a fresh ``flwr-clientapp`` process
per task, which imports torch and transformers and rebuilds the model every time.
:func:`serve` takes the tasks itself, through the same Runtime API calls that
``flwr-clientapp`` makes (``AcquireTask``, then pull the message, run the
ClientApp, push the reply and the task output), so the ClientApp's per-run cache
(``clients/app.py``) survives from message to message.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,  # pylint: disable=E0611
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

log = logging.getLogger("fedlora.client")


def _runtime_client(address: str, interceptors: list) -> RuntimeHttpClient:
    # A bounded retry: Flower's default one signals the process on HTTP 401.
    retry = RetryInvoker(lambda: exponential(max_delay=1.0), httpx.TransportError, max_tries=5,
                         max_time=10.0)
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True,
                                                 root_certificates=None, interceptors=interceptors,
                                                 retry_invoker=retry)


def pull_task_input(client: RuntimeHttpClient):
    """Flower's ``pull_task_input``, retrying object pulls after 20 ms instead of 1 s.

    The SuperNode hands out the task as soon as the message arrives, possibly
    before all its objects are stored; Flower's default first backoff (1 s) then
    dominates a round.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    msgs = client.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        raise RuntimeError("no message for this task")
    node, tree = Node(node_id=context.node_id), msgs.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=0.02, backoff_cap=0.5)
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run_from_proto(res.run), fab_from_proto(res.fab)


def run_task(address: str, token: str, app) -> bool:
    """Execute one task with ``app`` (a ``ClientApp``); True if it completed."""
    client = _runtime_client(address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                       RuntimeTokenHttpInterceptor(token)])
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    marks = [time.perf_counter()]
    try:
        message, context, _run, _fab = pull_task_input(client)
        marks.append(time.perf_counter())
        try:
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # the ClientApp raised: reply with an error, keep serving
            log.exception("ClientApp raised")
            details = f"{type(exc).__name__}: {exc}"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
        marks.append(time.perf_counter())
        push_message(client, reply, context)
    finally:
        push_task_output(client, context, status, details)
        marks.append(time.perf_counter())
        heartbeat.stop()
        client.close()
    steps = zip(("pull", "app", "push"), marks, marks[1:], strict=False)
    parts = ", ".join(f"{n} {b - a:.2f}s" for n, a, b in steps)
    log.info("task %s: %s", "completed" if status == SubStatus.COMPLETED else "failed", parts)
    return status == SubStatus.COMPLETED


def serve(address: str, app, poll: float = 0.05, stop: threading.Event | None = None) -> None:
    """Take and run ClientApp tasks from the SuperNode at ``address`` until ``stop`` is set.

    A SuperNode that is down or restarting is waited for, not fatal, and so is one that goes away
    in the middle of a task (its SuperLink declared it dead under load, say): the task is lost, the
    supervisor restarts the SuperNode, and this loop takes the next task.
    """
    stop = stop or threading.Event()
    control = None
    while not stop.is_set():
        try:
            if control is None:
                control = _runtime_client(
                    address, [RuntimeVersionHttpInterceptor(component_name="SuperExec")])
            res = control.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                try:
                    run_task(address, res.token, app)
                except (RuntimeError, httpx.HTTPError, OSError) as exc:
                    log.warning("task lost (%s: %s); waiting for the next one", type(exc).__name__, exc)
                continue
        except (httpx.HTTPError, OSError) as exc:
            log.debug("runtime API not reachable (%s); retrying", exc)
            if control is not None:
                control.close()
            control = None
            stop.wait(0.5)
            continue
        stop.wait(poll)
