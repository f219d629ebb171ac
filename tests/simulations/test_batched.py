"""The simulator's transport (simulations/batched.py): what it keeps of its clients for the checkpoint."""

from __future__ import annotations

import pytest

from fedlora.job.schema import JobConfig
from fedlora.rounds.checkpoint import load_checkpoint
from fedlora.simulations.engine import run


def test_round_0s_checkpoint_holds_the_dp_steps_of_fed_sbs_initialisation(tiny_bert_dir, tiny_csv, tmp_path,
                                                                           stop_after_round):
    # Prepare: Fed-SB under --dp sample, its initialisation (2 sketch phases × 1 batch) on round 0's
    # 2 sampled clients of 6; the run stopped (Ctrl-C) once round 0 is committed, as a kill in round 1
    cfg = JobConfig(model=str(tiny_bert_dir), data=str(tiny_csv), strategy="fed-sb", num_clients=6,
                    clients_per_round=2, rounds=2, local_steps=1, batch_size=4, max_length=16, rank=2,
                    dp="sample", epsilon=8.0, delta=1e-3, init_batches=1, dp_reproducible=True)
    stop_after_round(0)
    # Execute
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "run", checkpoints=True)
    # Assert: the checkpoint a --resume starts from counts the 2 steps each of those clients took
    # (it held none: the resumed run would have let them spend ε past the budget)
    assert load_checkpoint(tmp_path / "run")["ledgers"] == {c: 2 for c in cfg.sampled(0)}


def test_a_resumed_run_reports_the_largest_epsilon_spent_before_the_resume(tiny_bert_dir, tiny_csv, tmp_path,
                                                                           stop_after_round):
    # Prepare: --dp sample, one client of 3 per round: seed 3 samples client 1 in rounds 1 and 2 and
    # client 2 in round 3, so round 3's ε (the largest any client has spent) is client 1's two rounds
    cfg = JobConfig(model=str(tiny_bert_dir), data=str(tiny_csv), num_clients=3, clients_per_round=1,
                    rounds=3, local_steps=1, batch_size=4, max_length=16, rank=2, seed=3, dp="sample",
                    epsilon=50.0, noise_multiplier=1.0, delta=1e-3, dp_reproducible=True)
    assert [cfg.sampled(r) for r in (1, 2, 3)] == [[1], [1], [2]]
    whole = run(cfg, tmp_path / "whole")
    stop_after_round(2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut", checkpoints=True)
    stop_after_round(None)
    # Execute
    resumed = run(cfg, tmp_path / "cut", checkpoints=True, resume=True)
    # Assert: the resumed round 3 reports client 1's ε, as the whole run does (it said client 2's alone)
    assert whole[3]["epsilon"] > whole[3]["epsilon_per_client"][0]
    assert resumed[3]["epsilon"] == whole[3]["epsilon"]
    assert resumed[3]["noise_multiplier"] == whole[3]["noise_multiplier"]
