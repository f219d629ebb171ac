"""The queries that tell nodes apart: which client a node is (asked when it connects), and the note
that tells a node it is left out (a second live node with a client's id), which its ClientApp refuses
so that its own output says why."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict


def identify_query(node: int) -> Message:
    """The query that asks ``node`` which client it is (the ClientApp answers from its node config)."""
    return Message(content=RecordDict({"config": ConfigRecord({"identify": True})}), message_type="query",
                   dst_node_id=node, group_id="identify")


def left_out_notice(node: int, client: int) -> Message:
    """The query that tells ``node`` it is left out: it says it is ``client``, which a live node
    already is (the ClientApp refuses it, so the reason shows on that fedlora-client's output)."""
    reason = (f"this node says it is client {client}, which another live node already is, so the server"
              " leaves it out of every round: give each fedlora-client its own --client-id (or"
              " --partition-id)")
    return Message(content=RecordDict({"config": ConfigRecord({"left-out": reason})}), message_type="query",
                   dst_node_id=node, group_id="identify")
