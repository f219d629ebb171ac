"""``--secagg``: the real ServerApp and ClientApp, in one process, over an in-memory grid.

The grid (``tests/server/local_grid.py``) delivers each message to the node's ClientApp (with
Flower's SecAgg+ mod) and hands the reply back; a node can stop answering from a given protocol
stage on, as a client that dies mid-round does. Deployment over real processes is in
``test_deployment.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.task_identity import TaskIdentity

import fedlora.clients.secagg as client_side
import fedlora.server.flower_transport as server_side
from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.privacy.secagg import error_bound, quantization_range
from fedlora.server.app import run_server
from tests.server.local_grid import LocalGrid, adapter_tensors, run_config


@pytest.fixture()
def spies(monkeypatch):
    """Each client's clipped update and weight, and the server's secure result."""
    deltas, results = {}, []
    clip = client_side.clip_update

    def record_clip(delta, cfg):
        out, cut = clip(delta, cfg)
        deltas[TaskIdentity.node_id] = out
        return out, cut

    def record_round(*args, **kw):
        got = real_round(*args, **kw)
        results.append(got)
        return got

    real_round = server_side.secure_round
    monkeypatch.setattr(client_side, "clip_update", record_clip)
    monkeypatch.setattr(server_side, "secure_round", record_round)

    def per_client_path(*_a, **_k):
        raise AssertionError("the server aggregated individual uploads under --secagg")

    monkeypatch.setattr(server_side.FlowerTransport, "collect", per_client_path)
    return deltas, results


def expected_mean(deltas: dict, weights: dict) -> dict:
    total = sum(weights.values())
    names = next(iter(deltas.values()))
    return {k: sum(weights[n] * deltas[n][k].double() for n in weights) / total for k in names}


def test_secure_mean_equals_the_plain_weighted_mean(tiny_bert_dir, tiny_csv, tmp_path, spies):
    # Prepare: 3 clients, fedavg, capped weights (W = 100) so the bound is tight
    deltas, results = spies
    rc = run_config(tiny_bert_dir, tiny_csv, tmp_path / "run", secagg=True, max_examples=100)
    grid = LocalGrid(rc, 3)
    # Act
    run_server(grid, rc)
    # Assert: the server got only masked integer vectors and metrics, never an upload array
    assert all(len(rec) == 0 for r in grid.seen for rec in r.content.array_records.values())
    records = [r.content.config_records.get(RECORD_KEY_CONFIGS, {}) for r in grid.seen]
    masked = [rec for rec in records if Key.MASKED_PARAMETERS in rec]
    assert len(masked) == 3
    (got,) = results
    weights = {n: w for n, (w, _) in got.replies.items()}
    assert sorted(weights) == [0, 1, 2] and all(1 <= w <= 100 for w in weights.values())
    # ... and the secure mean is the clients' weighted mean within the quantization bound
    bound = error_bound(JobConfig(secagg=True, max_examples=100), 3, sum(weights.values()))
    assert bound < 1e-6
    want = expected_mean(deltas, weights)
    for k, t in want.items():
        assert (got.mean[k].double() - t).abs().max() <= bound + 1e-7  # + float32 rounding
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["secagg_error_bound"] == pytest.approx(bound) and row["agg_error"] is None
    assert row["bytes_up_per_client"][0] > 0


def test_secure_run_gives_the_plain_adapter(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: the same 2-round job with and without --secagg
    outs = {}
    for secure in (False, True):
        out = tmp_path / f"run{secure}"
        rc = {**run_config(tiny_bert_dir, tiny_csv, out, secagg=secure, max_examples=100), "rounds": 2}
        # Act
        run_server(LocalGrid(rc, 3), rc)
        outs[secure] = adapter_tensors(tmp_path / f"run{secure}")
    # Assert: the same adapter, up to quantization (≤ 4e-9 per coordinate in round 1) carried through
    # round 2's training (measured: 1.3e-6 at most, session 40)
    for k, t in outs[False].items():
        torch.testing.assert_close(outs[True][k], t, rtol=0, atol=5e-6)


def test_client_dropped_mid_protocol_is_tolerated(tiny_bert_dir, tiny_csv, tmp_path, spies):
    # Prepare: node 2 dies after sharing its keys, before sending its masked vector
    deltas, results = spies
    rc = run_config(tiny_bert_dir, tiny_csv, tmp_path / "run", secagg=True, max_examples=100)
    # Act
    run_server(LocalGrid(rc, 3, dead={2: "collect_masked_vectors"}), rc)
    # Assert: the round completes with the mean of the two survivors (node 2's masks removed)
    (got,) = results
    weights = {n: w for n, (w, _) in got.replies.items()}
    assert sorted(weights) == [0, 1]
    want = expected_mean({n: deltas[n] for n in weights}, weights)
    bound = error_bound(JobConfig(secagg=True, max_examples=100), 2, sum(weights.values()))
    for k, t in want.items():
        assert (got.mean[k].double() - t).abs().max() <= bound + 1e-7
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["clients"] == 2 and row["failed"] == 1


def test_too_many_dropped_clients_stop_the_round(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: 2 of 3 die after setup: 1 survivor is below SecAgg+'s threshold of 2 shares
    rc = run_config(tiny_bert_dir, tiny_csv, tmp_path / "run", secagg=True)
    # Act / Assert: no aggregate, a failed status that says why
    with pytest.raises(RuntimeError, match="fewer than --min-replies"):
        run_server(LocalGrid(rc, 3, dead={1: "share_keys", 2: "share_keys"}), rc)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed"


def test_quantization_range_leaves_room_for_every_client():
    # K clients' values (each < T) and weights sum below 2^32
    for k in (1, 2, 3, 10, 15, 16, 100, 1000):
        t = quantization_range(k)
        assert (k + 1) * t <= 2 ** 32 and 2 * (k + 1) * t > 2 ** 32
    assert quantization_range(10) == 2 ** 28


@pytest.mark.parametrize("flags, words", [
    ({"strategy": "flora"}, "weighted mean of the uploads"),
    ({"norm_bound": 3.0}, "--norm-bound"),
    ({"robust_mean": "median"}, "--robust-mean"),
    ({"strategy": "fed-sb"}, "init=seed"),
    ({"secagg_threshold": 1.5}, "--secagg-threshold"),
    ({"num_clients": 1}, "at least 2 clients per round"),
])
def test_bad_secagg_jobs_are_refused_in_one_line(flags, words):
    from fedlora.job.checks import check_secagg_args

    with pytest.raises(UserError, match=words) as err:
        check_secagg_args(JobConfig(secagg=True, **flags))
    assert "\n" not in str(err.value)


def test_secagg_flags_without_secagg_are_refused():
    from fedlora.job.checks import check_secagg_args

    # --secagg-range without --secagg was ignored without a word
    with pytest.raises(UserError, match="^--secagg-range sets up --secagg, which this job does not use"):
        check_secagg_args(JobConfig(secagg_range=2.0))


def test_client_level_dp_under_secagg_clips_on_the_clients(tiny_bert_dir, tiny_csv, tmp_path, spies):
    # Prepare: --dp client with a clip far below the updates' norms, so every client clips
    deltas, _ = spies
    rc = run_config(tiny_bert_dir, tiny_csv, tmp_path / "run", secagg=True, dp="client", epsilon=8.0,
                    update_clip=1e-3)
    # Act
    run_server(LocalGrid(rc, 3), rc)
    # Assert: each update left its client with norm C, weight 1; the row reports ε and the clip share
    for delta in deltas.values():
        norm = sum(float((t.double() ** 2).sum()) for t in delta.values()) ** 0.5
        assert norm == pytest.approx(1e-3, rel=1e-5)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["secagg_clipped"] == 1.0 and 0 < row["epsilon"] <= 8.0


def test_batched_simulator_refuses_secagg_in_one_line(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    from fedlora.simulations.cli import main as sim

    code = sim(["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--secagg", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--engine flower" in err and len(err.splitlines()) == 1



def test_secagg_over_an_nf4_base_is_the_plain_weighted_mean(tiny_llama_dir, tmp_path, spies):
    # Prepare: a causal-lm job over a 4-bit base (the server's model and every client's); 40 lines,
    # so 32 training examples over 3 clients (weights capped at 100)
    pytest.importorskip("bitsandbytes")
    deltas, results = spies
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat sat on mat number {i}"}) + "\n" for i in range(40)))
    rc = run_config(tiny_llama_dir, data, tmp_path / "run", secagg=True, max_examples=100, quantize="nf4",
                    task="causal-lm")
    grid = LocalGrid(rc, 3)
    # Act
    run_server(grid, rc)
    # Assert: every client trained over Linear4bit layers; the secure mean is the clients' weighted
    # mean of their updates within SecAgg+'s bound, which the row reports
    assert all(layer.quantized for cache in grid.clients.values() for client in cache.values()
               for layer in client.fm.adapters.values())
    (got,) = results
    weights = {n: w for n, (w, _) in got.replies.items()}
    assert sorted(weights) == [0, 1, 2] and sum(weights.values()) == 32
    bound = error_bound(JobConfig(secagg=True, max_examples=100), 3, 32)
    want = expected_mean(deltas, weights)
    for k, t in want.items():
        assert (got.mean[k].double() - t).abs().max() <= bound + 1e-7
    assert max(float(t.abs().max()) for t in want.values()) > 1e3 * bound     # the updates are not noise
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["secagg_error_bound"] == pytest.approx(bound) and row["agg_error"] is None
