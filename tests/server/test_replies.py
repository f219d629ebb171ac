"""Malformed client replies are rejected by name and leave the aggregate untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.job.schema import JobConfig
from fedlora.models.state import upload_tensors
from fedlora.rounds.build import make_strategy
from fedlora.rounds.coordinator import Coordinator
from fedlora.rounds.wire import to_record
from fedlora.server.flower_transport import FlowerTransport, RoundSettings
from fedlora.strategies import ClientUpload
from fedlora.strategies.plan import LORA


def make_coord(tiny_bert_dir, **kw) -> Coordinator:
    from fedlora.models.hub import load_model
    from fedlora.models.model import AdapterConfig, FederatedModel

    cfg = JobConfig(model=str(tiny_bert_dir), rank=4, num_clients=3, seed=0, **kw)
    model, *_ = load_model(cfg.model, "sequence-classification", 3, seed=0)
    fm = FederatedModel(model, AdapterConfig(ranks=[4], alpha=16.0, train_head=True))
    c = Coordinator(cfg, make_strategy(cfg), fm, test={})
    c.start()
    return c


@pytest.fixture()
def coord(tiny_bert_dir):
    return make_coord(tiny_bert_dir)


def transport(coord: Coordinator, min_replies: int = 1) -> FlowerTransport:
    """The Flower transport of ``coord`` after nodes 10, 11, 12 identified as clients 0, 1, 2."""
    t = FlowerTransport(None, coord, RoundSettings(min_replies=min_replies), [])
    t.nodes, t.clients = {0: 10, 1: 11, 2: 12}, {10: 0, 11: 1, 12: 2}
    return t


def aggregate(t: FlowerTransport, replies: list[Message]):
    """Round 1 from ``replies``: the valid uploads, aggregated by the coordinator."""
    got = t.collect(replies, {}, 1)
    t.coord.aggregate(got.uploads)
    return got


def good_upload(coord: Coordinator, k: int) -> dict[str, torch.Tensor]:
    """Client k's plausible upload: the global factors nudged by a k-dependent amount."""
    g = torch.Generator().manual_seed(k)
    up = ClientUpload(num_examples=10 + k, scale=4.0, head=copy.deepcopy(coord.state.head))
    for name, (A, B) in coord.state.factors.items():
        up.factors[name] = (A + 0.01 * torch.randn(A.shape, generator=g),
                            B + 0.01 * torch.randn(B.shape, generator=g))
    return upload_tensors(up, LORA)


def reply(node: int, tensors: dict, client_id: int, rank: int = 4, examples: int = 10) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    ins = Message(content=RecordDict(), message_type="train", dst_node_id=node, group_id="1")
    ins.metadata.__dict__["_message_id"] = f"m{node}"
    metrics = MetricRecord({"num-examples": examples, "train-loss": 1.0, "train-seconds": 0.1,
                            "rank": rank, "client-id": client_id})
    return Message(RecordDict({"upload": to_record(tensors), "metrics": metrics}), reply_to=ins)


def bad_variants(good: dict[str, torch.Tensor]) -> dict[str, tuple[dict, str]]:
    """Each kind of malformed upload, with the words its rejection must contain."""
    a_key = next(k for k in good if k.endswith("lora_A"))
    out = {}
    out["missing"] = ({k: v for k, v in good.items() if k != a_key}, "missing")
    out["extra"] = ({**good, "evil.lora_Z": torch.zeros(2)}, "unexpected tensor 'evil.lora_Z'")
    out["dtype"] = ({**good, a_key: good[a_key].double()}, "dtype float64")
    out["shape"] = ({**good, a_key: good[a_key][:, :-1]}, "has shape")
    out["rank"] = ({**good, a_key: torch.cat([good[a_key], good[a_key]])}, "rank 8 instead")
    out["nan"] = ({**good, a_key: good[a_key].clone().fill_(float("nan"))}, "NaN or Inf")
    out["inf"] = ({**good, a_key: good[a_key].clone().fill_(float("inf"))}, "NaN or Inf")
    out["norm"] = ({**good, a_key: good[a_key] * 1e9}, "above the limit")
    return out


@pytest.mark.parametrize("kind", ["missing", "extra", "dtype", "shape", "rank", "nan", "inf", "norm"])
def test_malformed_reply_is_rejected_and_left_out(coord, kind):
    # Prepare: two valid replies (clients 0, 1) and one malformed one (client 2)
    good = [good_upload(coord, k) for k in range(3)]
    bad, words = bad_variants(good[2])[kind]
    ref = copy.deepcopy(coord)
    aggregate(transport(ref), [reply(10, good[0], 0), reply(11, good[1], 1)])
    strategy = transport(coord)
    # Execute
    got = aggregate(strategy, [reply(12, bad, 2), reply(11, good[1], 1), reply(10, good[0], 0)])
    # Assert: rejected by name, logged in the round's list; the aggregate equals the good-only one
    assert got.clients == [0, 1] and coord.round == 1
    assert len(strategy.rejected) == 1 and strategy.rejected[0]["node"] == 12
    assert words in strategy.rejected[0]["reason"]
    for name, (A, B) in coord.state.factors.items():
        assert torch.equal(A, ref.state.factors[name][0]) and torch.equal(B, ref.state.factors[name][1])


def test_wrong_declared_rank_and_empty_client_are_rejected(coord):
    good = good_upload(coord, 0)
    strategy = transport(coord)
    got = aggregate(strategy, [reply(10, good, 0, rank=8), reply(11, good, 1, examples=0),
                               reply(12, good, 2)])
    reasons = [r["reason"] for r in strategy.rejected]
    assert any("rank 8 is not this client's rank 4" in r for r in reasons)
    assert any("num-examples" in r for r in reasons)
    assert got.clients == [2]


def test_a_reply_for_another_client_than_its_node_is_rejected(coord):
    # Prepare: node 11 identified as client 1, and replies claiming to be client 2
    strategy = transport(coord)
    # Execute
    got = strategy.collect([reply(10, good_upload(coord, 0), 0), reply(11, good_upload(coord, 1), 2)], {}, 1)
    # Assert: only node 10's upload is kept, node 11's is rejected by name
    assert got.clients == [0] and [r["node"] for r in strategy.rejected] == [11]
    assert "client-id 2 is not the client this node identified as (1)" in strategy.rejected[0]["reason"]


def test_too_few_valid_replies_leave_the_state_unchanged(coord):
    before = copy.deepcopy(coord.state)
    strategy = transport(coord, min_replies=2)
    bad, _ = bad_variants(good_upload(coord, 0))["nan"]
    with pytest.raises(RuntimeError, match="fewer than --min-replies 2 valid ones"):
        aggregate(strategy, [reply(11, good_upload(coord, 1), 1), reply(10, bad, 0)])
    assert coord.round == 0
    for name, (A, B) in before.factors.items():
        assert torch.equal(coord.state.factors[name][0], A) and torch.equal(coord.state.factors[name][1], B)


def test_when_every_client_refused_the_job_the_advice_is_to_fix_it_not_to_resume(coord):
    # Prepare: every client refused for one reason (the job cannot run); one client failed otherwise
    strategy = transport(coord)
    same = "refused: 3 clients but only 2 training examples"
    strategy.errors, strategy.failures = [(0, same), (1, same)], (2, 0)
    job = strategy._too_few(1, 0)
    strategy.errors = [(0, same), (1, "the ClientApp raised: CUDA out of memory")]
    clients = strategy._too_few(1, 0)
    # Assert: --resume cannot help a job its clients refuse; it can help clients that failed
    assert "Every client refused the job for that reason: fix the job" in job and "--resume" not in job
    assert clients.endswith("fix the clients and rerun with --resume")


def test_a_claim_above_the_cap_is_logged_and_weighs_as_the_cap(tiny_bert_dir, caplog):
    # Prepare: the same three replies; client 2 claims 10⁹ examples, then honestly the cap (10)
    capped, honest = make_coord(tiny_bert_dir, max_examples=10), make_coord(tiny_bert_dir, max_examples=10)
    ups = [good_upload(capped, k) for k in range(3)]
    # Execute
    with caplog.at_level("WARNING"):
        aggregate(transport(capped), [reply(10, ups[0], 0), reply(11, ups[1], 1),
                                      reply(12, ups[2], 2, examples=10**9)])
    aggregate(transport(honest), [reply(10, ups[0], 0), reply(11, ups[1], 1),
                                  reply(12, ups[2], 2, examples=10)])
    # Assert: logged against the cap; the aggregate is the one of an honest client at the cap
    assert "node 12 claims 1000000000 examples, above --max-examples 10: weighted as 10" in caplog.text
    for name, (A, B) in capped.state.factors.items():
        A_ref, B_ref = honest.state.factors[name]
        assert torch.allclose(A, A_ref) and torch.allclose(B, B_ref)


def test_an_oversized_reply_is_refused_before_its_arrays_are_decoded(coord, monkeypatch):
    # Prepare: client 2's record carries 8 MB more than its plan's tensors
    import numpy as np
    from flwr.app import Array

    import fedlora.server.flower_transport as server_strategy

    decoded = []
    real = server_strategy.from_record
    monkeypatch.setattr(server_strategy, "from_record", lambda rec: decoded.append(1) or real(rec))
    big = reply(12, good_upload(coord, 2), 2)
    big.content["upload"]["data.float64"] = Array(np.zeros(1_000_000))
    strategy = transport(coord)
    # Execute
    good = [reply(10, good_upload(coord, 0), 0), reply(11, good_upload(coord, 1), 1)]
    aggregate(strategy, [*good, big])
    # Assert: refused by size, and only the two good records were decoded
    assert len(strategy.rejected) == 1 and strategy.rejected[0]["node"] == 12
    assert "refused before decoding" in strategy.rejected[0]["reason"]
    assert len(decoded) == 2


def test_an_unreachable_nodes_error_names_that_node_not_the_superlink():
    from flwr.app import Error

    from fedlora.server.polling import send_and_collect

    class Grid:  # node 5 is gone: the SuperLink (node 1) answers for it with an error
        def push_messages(self, messages):
            self.sent = list(messages)
            return ["m5"]

        def pull_messages(self, ids):
            reply = Message(error=Error(code=0, reason="Node Unavailable"), reply_to=self.sent[0])
            reply.metadata.__dict__.update(_src_node_id=1, _reply_to_message_id="m5")
            return [reply]

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(content=RecordDict(), message_type="train", dst_node_id=5, group_id="1")
    msg.metadata.__dict__["_message_id"] = "m5"
    replies, errors, missing = send_and_collect(Grid(), [msg], timeout=1.0)
    assert (replies, errors, missing) == ([], [(5, "Node Unavailable")], [])  # it said node 1, client None
