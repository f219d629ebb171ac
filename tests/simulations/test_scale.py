"""Client sampling and passes of bounded size in the simulator (tiny BERT, toy CSV)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedlora.job.schema import JobConfig
from fedlora.simulations import engine
from fedlora.simulations.engine import run


def job(tiny_bert_dir, tiny_csv, **kw) -> JobConfig:
    base = dict(model=str(tiny_bert_dir), data=str(tiny_csv), num_clients=5, rounds=2, local_steps=2,
                batch_size=4, max_length=16, rank=4)
    base.update(kw)
    return JobConfig(**base)


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


STRATEGY_JOBS = [("fedavg", None), ("flora", [2, 4, 3]), ("fed-sb", None), ("ffa-lora", None),
                 ("rolora", None), ("fedex-lora", None), ("flexlora", [2, 4, 3]), ("fedsa-lora", None)]


@pytest.mark.parametrize("strategy, ranks", STRATEGY_JOBS)
def test_passes_of_two_equal_one_pass(tiny_bert_dir, tiny_csv, tmp_path, strategy, ranks):
    # Prepare: the same 5-client job, all clients in one pass vs passes of 2, 2 and 1; each
    # client holds out 30% of its examples (personal_accuracy)
    kw = dict(strategy=strategy, ranks=ranks, personal_test_fraction=0.3, rounds=3)
    one = job(tiny_bert_dir, tiny_csv, **kw)
    split = job(tiny_bert_dir, tiny_csv, max_clients_per_pass=2, **kw)
    # Execute
    rows_one = run(one, tmp_path / "one")
    rows_split = run(split, tmp_path / "split")
    # Assert: same adapter (to float tolerance), same bytes, same clients per round
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    for r1, r2 in zip(rows_one, rows_split, strict=True):
        assert r1["bytes_up_per_client"] == r2["bytes_up_per_client"]
        assert r1["bytes_down_per_client"] == r2["bytes_down_per_client"]
        assert r1["clients"] == r2["clients"]
        assert r1.get("personal_accuracy") == pytest.approx(r2.get("personal_accuracy"), abs=1e-9)
    # every round ≥ 1 measures each client's own model on its held-out 30%
    assert all(r["personal_clients"] == 5 and 0.25 * 144 < r["personal_examples"] < 0.35 * 144
               for r in rows_one[1:])
    if strategy in ("ffa-lora", "rolora", "fedex-lora", "flexlora"):  # exact aggregates
        assert all(r["agg_error"] <= 1e-5 for r in rows_one[1:])


def test_sampled_clients_are_drawn_from_seed_and_round_only():
    # Prepare / Execute
    cfg = JobConfig(num_clients=10, clients_per_round=3, seed=4)
    draws = [cfg.sampled(r) for r in range(1, 6)]
    # Assert: 3 distinct sorted ids per round, repeatable, not the same every round
    assert all(len(set(d)) == 3 and d == sorted(d) and max(d) < 10 for d in draws)
    assert draws == [JobConfig(num_clients=10, clients_per_round=3, seed=4).sampled(r) for r in range(1, 6)]
    assert len({tuple(d) for d in draws}) > 1
    assert JobConfig(num_clients=4).sampled(1) == [0, 1, 2, 3]


def test_sampling_trains_and_bills_only_the_sampled_clients(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: FLoRA, 2 of 5 clients a round for 3 rounds
    cfg = job(tiny_bert_dir, tiny_csv, strategy="flora", clients_per_round=2, rounds=3)
    # Execute
    rows = run(cfg, tmp_path / "out")
    # Assert: 2 uploads per round; a client that missed a round's fold pays for it later
    seen: dict[int, int] = {}
    compared = 0
    for row in rows[1:]:
        assert row["clients"] == 2 and len(row["bytes_up_per_client"]) == 2
        clients = cfg.sampled(row["round"])
        missed = [row["round"] - 1 - seen.get(c, 0) for c in clients]   # folds still to apply
        down = dict(zip(clients, row["bytes_down_per_client"], strict=True))
        if len(set(missed)) > 1:   # different backlogs, different payloads
            more, less = max(clients, key=lambda c: missed[clients.index(c)]), \
                min(clients, key=lambda c: missed[clients.index(c)])
            assert down[more] > down[less]
            compared += 1
        for c in clients:
            seen[c] = row["round"]
    assert compared >= 1   # seed 0 gives rounds whose two clients have different backlogs


def test_cpu_pass_size_counts_tokens_not_clients(monkeypatch):
    monkeypatch.setattr(engine, "CPU_PASS_TOKENS", 4096)
    # 8 rows × 64 tokens = 512 tokens per client: 4096 // 512 = 8 clients per pass
    assert engine.pass_size(JobConfig(batch_size=8, max_length=64), 100) == 8
    assert engine.pass_size(JobConfig(batch_size=8, max_length=64), 5) == 5  # fewer clients than fit
    # 256 × 32 = 8192 tokens: more than a pass, so each client trains alone
    assert engine.pass_size(JobConfig(batch_size=256, max_length=32), 10) == 1
    # an explicit --max-clients-per-pass wins
    assert engine.pass_size(JobConfig(batch_size=8, max_length=64, max_clients_per_pass=20), 100) == 20
