"""The Flower ``ClientApp``: trains this node's adapter on its data.

Replies carry the upload (``upload`` arrays, or ``grads`` for Fed-SB's round 0) and
``metrics`` (``num-examples``, ``train-loss``, ``train-seconds``, ``rank``,
``client-id``). The node's :class:`fedlora.local.LocalClient` (model, data, folds)
is cached per (run, node): under ``fedlora-client`` the ClientApp runs inside one
long-lived process, so the base model is loaded once per run, not per message.
"""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.config import from_run_config
from fedlora.local import ClientData, LocalClient
from fedlora.wire import from_record, to_record

app = ClientApp()
_CACHE: dict[tuple[int, int], LocalClient] = {}


def local_client(msg: Message, context: Context) -> LocalClient:
    """This node's warm client for the message's run (built on first use)."""
    key = (context.run_id, context.node_id)
    client = _CACHE.get(key)
    if client is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _CACHE.clear()  # one run at a time: release the previous run's model
        cfg = from_run_config(dict(context.run_config))
        labels = [n for n in msg.content["config"]["label-names"] if n]
        client = LocalClient(cfg, ClientData.from_node_config(dict(context.node_config)), labels)
        _CACHE[key] = client
    if client.budget is not None and "fedlora-privacy" in context.state.config_records:
        # the ledger outlives a rebuilt client (Flower's simulation; a ClientApp restarted by its node)
        client.budget.steps = max(client.budget.steps,
                                  int(context.state.config_records["fedlora-privacy"]["steps"]))
    return client


def _keep_ledger(client: LocalClient, context: Context) -> None:
    if client.budget is not None:
        context.state["fedlora-privacy"] = ConfigRecord({"steps": client.budget.steps})


def _metrics(client: LocalClient, seconds: float, loss: float = 0.0) -> MetricRecord:
    return MetricRecord({"num-examples": len(client), "train-loss": float(loss),
                         "train-seconds": float(seconds), "rank": client.rank,
                         "client-id": client.where.client_id, "epsilon": float(client.epsilon)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Round t: load the global state (and missing folds), train, reply with the adapter."""
    client = local_client(msg, context)
    conf = msg.content["config"]
    rnd = int(conf["round"])
    catch = from_record(msg.content["catchup"]) if "catchup" in msg.content.array_records else {}
    seed = int(conf["fresh-seed"])
    client.load(rnd, from_record(msg.content["global"]), catch, None if seed < 0 else seed)
    upload, loss, seconds = client.fit(rnd)
    _keep_ledger(client, context)
    return Message(RecordDict({"upload": to_record(upload), "metrics": _metrics(client, seconds, loss)}),
                   reply_to=msg)


@app.query()
def gradient(msg: Message, context: Context) -> Message:
    """Fed-SB round 0: this client's gradient estimate for every adapted weight."""
    client = local_client(msg, context)
    grads, seconds = client.gradient()
    _keep_ledger(client, context)
    return Message(RecordDict({"grads": to_record(grads), "metrics": _metrics(client, seconds)}),
                   reply_to=msg)
