"""``fedlora-plan``'s bytes per client per round equal the simulator's rows, for every strategy."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.job.schema import JobConfig
from fedlora.plan.shape import build_shape
from fedlora.plan.traffic import Replay, plan_traffic, record_bytes
from fedlora.rounds.wire import tensor_bytes
from fedlora.simulations.engine import run
from fedlora.strategies import STRATEGIES

#: Per strategy, what makes its traffic uneven: folds a client missed (3 rounds, 2 of 4 clients a
#: round), mixed ranks, a first download of shared or kept factors, Fed-SB's sketches in round 0.
EXTRA = {"flora": {"ranks": [2, 4, 3, 4], "rounds": 3}, "fedex-lora": {"rounds": 3},
         "flexlora": {"ranks": [2, 4, 3, 4]}, "fedsa-lora": {"personal_test_fraction": 0.25}}
#: Jobs beside each strategy's own: FedEx-LoRA under a server step, whose fold is 2r wider
VARIANTS = {"fedex-lora+server-lr": ("fedex-lora", {"server_lr": 2.0})}
JOBS = sorted(STRATEGIES) + sorted(VARIANTS)


@pytest.mark.parametrize("tensors", [
    {},
    {"layer.lora_A": torch.randn(4, 32), "layer.lora_B": torch.randn(32, 4)},
    {f"model.layers.{i}.self_attn.q_proj.lora_A": torch.randn(16, 300) for i in range(40)},
    {"big": torch.randn(2_700_000), "small": torch.randn(7), "head.bias": torch.randn(3, dtype=torch.float64),
     "steps": torch.arange(5)},                                                   # 3 chunks, 3 dtypes
], ids=["empty", "one-layer", "forty-layers", "chunks-and-dtypes"])
def test_record_bytes_from_shapes_equal_the_serialized_record(tensors):
    assert record_bytes(tensors) == tensor_bytes(tensors)


def _job(model, data, name: str) -> JobConfig:
    strategy, variant = VARIANTS.get(name, (name, {}))
    values = dict(strategy=strategy, model=str(model), data=str(data), task="causal-lm", num_clients=4,
                  clients_per_round=2, rounds=2, local_steps=1, batch_size=2, rank=4, max_length=16,
                  eval_max=2, lr=1e-3, target_modules=["all-linear"], seed=1)
    return JobConfig(**{**values, **EXTRA.get(strategy, {}), **variant})


@pytest.fixture(scope="module")
def simulated(tiny_llama_dir, tmp_path_factory):
    """Every strategy's rows, each from one short simulation of the tiny LLaMA (on one thread: a
    32-wide model gains nothing from two, and loses much when other processes hold the cores)."""
    tmp = tmp_path_factory.mktemp("plan-traffic")
    data = tmp / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat sat on mat number {i}"}) + "\n" for i in range(40)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: (_job(tiny_llama_dir, data, name), run(_job(tiny_llama_dir, data, name), tmp / name))
                for name in JOBS}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("strategy", JOBS)
def test_planned_bytes_equal_the_simulators(simulated, strategy):
    # Prepare: the simulator's rows, and the planner's replay of the same job on the meta-device model
    cfg, rows = simulated[strategy]
    shape = build_shape(cfg)
    # Execute
    plan = plan_traffic(cfg, shape.layers, shape.heads)
    # Assert: every round (0 = initialisation), every client, both ways, to the byte
    assert [p.round for p in plan] == [r["round"] for r in rows]
    assert [p.up for p in plan] == [r["bytes_up_per_client"] for r in rows]
    assert [p.down for p in plan] == [r["bytes_down_per_client"] for r in rows]
    assert [p.clients for p in plan[1:]] == [r["client_ids"] for r in rows[1:]]
    if strategy == "fed-sb":   # round 0 is the sketched initialisation
        assert plan[0].up and min(plan[0].up) > 0
    if strategy == "flora":    # a client that missed a round's fold is sent it: downloads differ
        assert len(set(plan[3].down)) > 1
    if strategy in VARIANTS:   # the server step's wider fold costs more down than the plain job's
        plain = simulated[VARIANTS[strategy][0]][1]
        assert sum(plan[2].down) > sum(plain[2]["bytes_down_per_client"])


def test_a_checkpoint_without_a_pooler_is_planned_without_its_adapter(bert_mlm_dir, tiny_csv, tmp_path):
    # Prepare: a masked-LM checkpoint as a classifier; its pooler is drawn at load, so the job leaves
    # it out of all-linear (the planner, which reads no weights, adapted it: one layer too many)
    cfg = JobConfig(model=str(bert_mlm_dir), data=str(tiny_csv), num_clients=2, rounds=1, local_steps=1,
                    batch_size=2, rank=2, max_length=16, eval_max=2, target_modules=["all-linear"])
    rows = run(cfg, tmp_path / "run")
    # Execute
    shape = build_shape(cfg, num_labels=3)
    plan = plan_traffic(cfg, shape.layers, shape.heads)
    # Assert
    assert shape.fm.saved_modules == ["bert.pooler.dense"] and not any("pooler" in n for n in shape.layers)
    assert [p.up for p in plan] == [r["bytes_up_per_client"] for r in rows]
    assert [p.down for p in plan] == [r["bytes_down_per_client"] for r in rows]


def _long_job(model, strategy: str, **kw) -> JobConfig:
    """A 12-round job of 5 clients, 2 a round (mixed ranks where the strategy takes them)."""
    mixed = {"ranks": [2, 4, 3, 4, 2]} if STRATEGIES[strategy].heterogeneous_ranks else {}
    values = dict(strategy=strategy, model=str(model), task="causal-lm", num_clients=5, clients_per_round=2,
                  rounds=12, rank=4, max_length=16, target_modules=["all-linear"], seed=3)
    return JobConfig(**{**values, **mixed, **kw})


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_rounds_counted_once_per_shape_equal_rounds_counted_each(strategy, tiny_llama_dir, monkeypatch):
    # Prepare: a long job of uneven rounds (missed folds, first downloads, mixed ranks)
    cfg = _long_job(tiny_llama_dir, strategy)
    shape = build_shape(cfg)
    # Execute: counted once per shape of round, then every round counted afresh
    once = plan_traffic(cfg, shape.layers, shape.heads)
    monkeypatch.setattr(Replay, "_seen", lambda self, key, count: count())
    each = plan_traffic(cfg, shape.layers, shape.heads)
    # Assert: the same bytes, client by client, round by round
    assert [(r.clients, r.up, r.down) for r in once] == [(r.clients, r.up, r.down) for r in each]


def test_alike_rounds_aggregate_once(tiny_llama_dir, monkeypatch):
    # Prepare: FedAvg over 40 rounds, counting its aggregates
    cfg = _long_job(tiny_llama_dir, "fedavg", rounds=40)
    shape = build_shape(cfg)
    calls, fedavg = [], STRATEGIES["fedavg"]
    counted = fedavg.aggregate
    monkeypatch.setattr(fedavg, "aggregate", lambda self, *a: calls.append(1) or counted(self, *a))
    # Execute
    plan = plan_traffic(cfg, shape.layers, shape.heads)
    # Assert: every round planned, from one aggregate per distinct pair of ranks at most
    assert len(plan) == 41 and 1 <= len(calls) <= 4
