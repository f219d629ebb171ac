"""Sending a round's messages over a Flower ``Grid`` without Flower's fixed 3 s sleeps.

``Grid.send_and_receive`` polls the SuperLink every 3 s; a round here waits for
replies with short polls (``poll`` seconds, default 0.1 s) on the same public Grid
calls (``push_messages`` / ``pull_messages``), ends as soon as every reply is in or
the round timeout passes, and keeps error replies apart from results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

log = logging.getLogger("fedlora.server")


def fast_object_pulls(max_time: float | None = None) -> None:
    """Make the ServerApp's grid retry a reply's missing objects after 20 ms, not 1 s, and give
    up on them after ``max_time`` seconds (the round timeout) instead of Flower's 500 tries.

    A reply can be listed before all its objects reached the SuperLink; Flower's default first
    backoff of 1 s would then add a second to the round. A reply whose objects never arrive (the
    SuperLink refused them as oversize, or the client died mid-upload) becomes an error reply
    after ``max_time``; with Flower's defaults it held the whole round for about 3 minutes.
    """
    from functools import partial

    import flwr.superlink.grid.http_grid as http_grid
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    limits = {} if max_time is None else {"max_time": max_time, "max_tries_per_object": None}
    http_grid.pull_objects = partial(pull_objects, initial_backoff=0.02, backoff_cap=0.5, **limits)


def wait_for_nodes(grid, wanted: int, timeout: float, poll: float = 0.2) -> list[int]:
    """Connected node ids, sorted, once ``wanted`` are connected or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            return nodes
        if len(nodes) != last:
            log.info("waiting for clients: %d of %d connected", len(nodes), wanted)
            last = len(nodes)
        time.sleep(poll)


def push(grid, messages: Iterable) -> dict[str, int]:
    """Push ``messages``; ``{message id: destination node id}``."""
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    return {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=False)}


def gather(grid, ids: Iterable[str], timeout: float, poll: float = 0.1) -> list:
    """The replies (error replies too) to the messages ``ids`` that arrive within ``timeout``
    seconds (0: what one pull finds)."""
    pending, replies = set(ids), []
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def collect(grid, messages: Iterable, timeout: float, poll: float = 0.1, sent: dict | None = None):
    """Push ``messages``; return ``(replies, missing_node_ids)``: every reply (error replies
    too) that arrived before ``timeout``, and the nodes that sent none. ``sent``, if given, is
    filled with message id -> the node it went to."""
    dst = push(grid, messages)
    if sent is not None:
        sent.update(dst)
    replies = gather(grid, dst, timeout, poll)
    answered = {r.metadata.reply_to_message_id for r in replies}
    return replies, sorted(node for mid, node in dst.items() if mid not in answered)


def send_and_collect(grid, messages: Iterable, timeout: float, poll: float = 0.1):
    """Push ``messages``; return ``(replies, errors, missing_node_ids)``.

    ``replies``: result messages; ``errors``: ``(node_id, reason)`` for error replies
    (a crashed ClientApp, an unreachable node), the node being the one the message went to (the
    SuperLink sends an unreachable node's error reply itself); ``missing``: nodes that did not
    reply before ``timeout``.
    """
    sent: dict = {}
    got, missing = collect(grid, messages, timeout, poll, sent)
    replies = [r for r in got if not r.has_error()]
    errors = [(sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r.error.reason or "error")
              for r in got if r.has_error()]
    return replies, errors, missing
