"""The server's side of ``--secagg``: one round through Flower's SecAgg+ workflow.

``flwr.server.workflow.SecAggPlusWorkflow`` drives the protocol (setup, key sharing, masked
vectors, unmasking) but speaks to a *legacy* strategy (``configure_fit`` / ``aggregate_fit``) and
sends every node the same ``FitIns``. This bridge, which adds no cryptography:

* gives the workflow a stand-in legacy strategy that selects the round's nodes and receives the
  unmasked aggregate (:class:`_Receiver`);
* swaps each node's ``FitIns`` for fedlora's per-node ``train`` content (global state, missing
  folds, round config) once the setup stage has chosen the nodes (:class:`_Workflow`);
* hands the workflow a grid (:class:`_Wire`) that polls replies every ``poll`` s instead of
  Flower's 3 s, counts bytes per node, and drops a masked vector of the wrong size or shape
  *before* the workflow adds it up (its node then counts as dropped: SecAgg+ removes its masks).

What the server ever holds of a client is its public keys, encrypted key shares it forwards, its
masked vector and its metrics; :func:`secure_round` returns the weighted mean update
``Σ w_k Δ_k / Σ w_k`` (``fedlora.privacy.secagg``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from torch import Tensor

from fedlora.privacy.secagg import MODULUS, max_weight, quantization_range, unflatten, value_range
from fedlora.rounds.validate import FRAMING
from fedlora.rounds.wire import array_bytes
from fedlora.server.polling import collect

log = logging.getLogger("fedlora.server")


@dataclass
class SecureResult:
    """One secure round: the mean update by tensor name, and per replying node its weight and
    metrics; bytes sent and received per node (protocol messages included); dropped nodes."""

    mean: dict[str, Tensor]
    replies: dict[int, tuple[int, dict]]
    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)


def message_bytes(content: RecordDict) -> int:
    """Bytes of a message's arrays and of the bytes and strings in its config records."""
    total = array_bytes(content)
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total


class _Receiver(LegacyStrategy):
    """The legacy strategy the workflow calls: selects ``nodes``, keeps the aggregate's results."""

    def __init__(self, grid, nodes: list[int]) -> None:
        self.grid, self.nodes, self.results = grid, nodes, []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(n, self.grid, 0), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """SecAgg+ with fedlora's per-node training content in place of one shared ``FitIns``."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs) -> None:
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return ok


class _Wire:
    """The grid the workflow sees: fast polls, byte counts, masked vectors checked before summing."""

    def __init__(self, grid, poll: float, shapes: list[tuple[int, ...]]) -> None:
        self.grid, self.poll, self.shapes = grid, poll, [(1,), *shapes]  # SecAgg+ prepends the weight
        self.up: dict[int, int] = {}
        self.down: dict[int, int] = {}
        self.rejected: list[dict] = []

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        for m in messages:
            node = m.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + message_bytes(m.content)
        replies, _ = collect(self.grid, messages, math.inf if timeout is None else timeout, self.poll)
        kept = []
        for r in replies:
            node = r.metadata.src_node_id
            if not r.has_error():
                self.up[node] = self.up.get(node, 0) + message_bytes(r.content)
                reason = self._bad_vector(r.content)
                if reason:
                    log.warning("rejected reply from node %s: %s", node, reason)
                    self.rejected.append({"node": node, "reason": reason})
                    continue
            kept.append(r)
        return kept

    def _bad_vector(self, content: RecordDict) -> str | None:
        """Why a masked vector cannot be summed (wrong count, size or shape), or None."""
        record = content.config_records.get(RECORD_KEY_CONFIGS)
        if record is None or Key.MASKED_PARAMETERS not in record:
            return None
        vector = record[Key.MASKED_PARAMETERS]
        if not isinstance(vector, list) or len(vector) != len(self.shapes):
            count = len(vector) if isinstance(vector, list) else 0
            return f"masked vector has {count} arrays, expected {len(self.shapes)}"
        for raw, shape in zip(vector, self.shapes, strict=True):
            if len(raw) > 8 * math.prod(shape) + FRAMING:  # refused before it is decoded
                return f"masked array of {len(raw)} bytes, expected at most {8 * math.prod(shape) + FRAMING}"
            got = bytes_to_ndarray(raw)
            if got.shape != shape or not np.issubdtype(got.dtype, np.integer):
                return f"masked array of shape {got.shape} ({got.dtype}), expected {shape} integers"
        return None


def secure_round(grid, contents: dict[int, RecordDict], rnd: int, cfg, shapes: dict[str, tuple[int, ...]],
                 timeout: float, poll: float = 0.1) -> SecureResult | None:
    """Run SecAgg+ over ``contents`` (node -> its ``train`` content); None if the protocol stopped
    (fewer live nodes than its reconstruction threshold)."""
    names = sorted(shapes)
    wire = _Wire(grid, poll, [tuple(shapes[n]) for n in names])
    receiver = _Receiver(grid, sorted(contents))
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=receiver)
    workflow = _Workflow(contents, num_shares=1.0, reconstruction_threshold=float(cfg.secagg_threshold),
                         max_weight=float(max_weight(cfg)), clipping_range=value_range(cfg),
                         quantization_range=quantization_range(len(contents)), modulus_range=MODULUS,
                         timeout=timeout)
    workflow(wire, context)
    if not receiver.results:
        return None
    arrays = parameters_to_ndarrays(receiver.results[0][1].parameters)
    mean = {k: t.float() for k, t in unflatten([np.asarray(a) for a in arrays], names).items()}
    replies = {proxy.node_id: (int(res.num_examples), dict(res.metrics)) for proxy, res in receiver.results}
    return SecureResult(mean, replies, wire.up, wire.down, wire.rejected)
