"""The real ServerApp and ClientApp in one process, over an in-memory grid.

:class:`LocalGrid` delivers each message to the node's ClientApp (``fedlora.clients.app.app``, with
Flower's SecAgg+ mod) after a protobuf round trip, as over the wire, and hands the reply back to the
ServerApp (:func:`fedlora.server.app.run_server`). Each node keeps its ``Context`` (``context.state``)
for the grid's lifetime, as a SuperNode does, and its own warm client, as its own ``fedlora-client``
process would (the ClientApp caches one client per process: the grid swaps each node's in and out).
With ``stateless=True`` every message finds the node's client rebuilt (the cache emptied first), as
on Flower's simulation engine, where only ``context.state`` survives between messages.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedlora.clients import app as client_module
from fedlora.job.runconfig import to_run_config
from fedlora.job.schema import JobConfig

SERVER = 1 << 40
STAGES = ["setup", "share_keys", "collect_masked_vectors", "unmask"]


def forget_clients() -> None:
    """Empty the ClientApp's per-(run, node) cache: the next message builds its client afresh."""
    client_module._CACHE.clear()


class LocalGrid:
    """Nodes ``0..n-1`` running the ClientApp in this process; ``dead``: node -> the SecAgg+ stage
    from which it no longer answers. ``seen`` keeps every reply the server pulled.

    A new grid starts with no cached client (every grid uses run id 1, so a client cached by an
    earlier grid would otherwise serve this one)."""

    def __init__(self, run_config: dict, n: int, dead: dict[int, str] | None = None,
                 stateless: bool = False) -> None:
        forget_clients()
        # a node per process, as in a deployment; one model at a time, as on Flower's simulation engine
        client_module.CACHED_CLIENTS = 1 if stateless else n
        self.contexts = {k: Context(run_id=1, node_id=k, node_config={"partition-id": k, "num-partitions": n},
                                    state=RecordDict(), run_config=run_config) for k in range(n)}
        self.dead = dict(dead or {})
        self.stateless = stateless
        self.clients: dict[int, dict] = {}  # node -> its process's ClientApp cache
        self.replies: dict[str, object] = {}
        self.seen: list = []
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER, 1  # the ServerApp

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = msg.metadata.dst_node_id
            stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
            if node in self.dead and stage in STAGES[STAGES.index(self.dead[node]):]:
                continue  # this node is gone: no reply, ever
            msg.metadata.__dict__["_src_node_id"] = SERVER
            forget_clients()
            if not self.stateless:
                client_module._CACHE.update(self.clients.get(node, {}))
            TaskIdentity.node_id = node
            # a copy, as over the wire: SecAgg+'s mod edits what it receives, and the server sends
            # one setup record to every node
            self.replies[mid] = client_module.app(over_the_wire(msg), self.contexts[node])
            TaskIdentity.node_id = SERVER
            if not self.stateless:
                self.clients[node] = dict(client_module._CACHE)
            forget_clients()
        return ids

    def pull_messages(self, ids):
        got = [self.replies.pop(i) for i in ids if i in self.replies]
        self.seen.extend(got)
        return got


def over_the_wire(msg: Message) -> Message:
    """A received copy of ``msg`` (Flower's protobuf round trip)."""
    return message_from_proto(message_to_proto(msg))


def run_config(tiny_bert_dir, tiny_csv, out, clients: int = 3, **kw) -> dict:
    """A 1-round tiny-BERT job's run config (``kw``: more ``JobConfig`` fields)."""
    cfg = JobConfig(model=str(tiny_bert_dir), data=str(tiny_csv), num_clients=clients, rounds=1,
                    local_steps=2, batch_size=4, max_length=16, rank=4, seed=0, **kw)
    return {**to_run_config(cfg), "out": str(out), "round-timeout": 5.0, "min-replies": 1}


def deployment_run_config(cfg: JobConfig, out: Path, round_timeout: float = 60.0) -> dict:
    """The run config ``fedlora-server`` submits for ``cfg`` (stateful clients, a fresh run)."""
    from fedlora.server.launch import run_config as server_run_config

    return server_run_config(cfg, out, round_timeout=round_timeout)


def flower_run_config(cfg: JobConfig, out: Path) -> dict:
    """The run config ``fedlora-sim --engine flower`` submits for ``cfg`` (stateless clients)."""
    from fedlora.simulations.flower_engine import run_config as flower_rc

    return flower_rc(cfg, out, 60.0)


def rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(expected: Path, got: Path, rtol: float, atol: float) -> None:
    """The PEFT adapters exported in the output folders ``expected`` and ``got`` hold the same tensors,
    each within ``rtol``/``atol``."""
    a, b = adapter_tensors(expected), adapter_tensors(got)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol)
