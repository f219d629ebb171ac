"""The local optimizer (``--optimizer``): hand-computed steps, and the job's flag reaches training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedlora.job.schema import JobConfig
from fedlora.training import train as train_module
from fedlora.training.optim import make_optimizer, round_lr
from fedlora.training.train import TrainConfig


def steps(kind: str, grads: list[list[float]], lr: float = 0.1, decay: float = 0.0) -> list[float]:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_optimizer([p], SimpleNamespace(optimizer=kind, lr=lr, weight_decay=decay))
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().tolist()


def test_sgd_with_momentum_by_hand():
    # step 1: b = g1 = (1, 2); θ = (1, -2) − 0.1 (1, 2) = (0.9, -2.2)
    assert steps("sgd", [[1.0, 2.0]]) == pytest.approx([0.9, -2.2])
    # step 2: b = 0.9 (1, 2) + (0, -1) = (0.9, 0.8); θ = (0.9, -2.2) − 0.1 (0.9, 0.8) = (0.81, -2.28)
    assert steps("sgd", [[1.0, 2.0], [0.0, -1.0]]) == pytest.approx([0.81, -2.28])


def test_adamw_first_step_moves_each_coordinate_by_lr_whatever_its_gradient():
    # m̂ = g, v̂ = g²: the step is lr · g / |g| (up to ε), for a tiny and a large gradient alike
    assert steps("adamw", [[1e-3, -50.0]]) == pytest.approx([0.9, -1.9], abs=1e-4)


def test_weight_decay_by_hand():
    # AdamW, decoupled: θ ← θ − lr·λ·θ, then the Adam step lr·g/|g|: with λ = 0.5 and g = (1, -1),
    # (1, -2) − 0.1·0.5·(1, -2) − 0.1·(1, -1) = (0.85, -1.8)
    assert steps("adamw", [[1.0, -1.0]], decay=0.5) == pytest.approx([0.85, -1.8], abs=1e-4)
    # SGD: λθ joins the gradient: g + λθ = (1, 2) + 0.5·(1, -2) = (1.5, 1); θ = (1, -2) − 0.1·(1.5, 1)
    assert steps("sgd", [[1.0, 2.0]], decay=0.5) == pytest.approx([0.85, -2.1])


def test_the_job_flag_reaches_local_training():
    assert TrainConfig.from_job(JobConfig(optimizer="sgd")).optimizer == "sgd"
    assert TrainConfig.from_job(JobConfig()).optimizer == "adamw"
    assert TrainConfig.from_job(JobConfig(weight_decay=0.01)).weight_decay == 0.01
    assert TrainConfig.from_job(JobConfig()).weight_decay == 0.0
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], SimpleNamespace(optimizer="rmsprop", lr=1.0,
                                                                             weight_decay=0.0))


def test_cosine_rates_by_hand():
    # T = 4, lr 1 → lr_min 0: (1 + cos(π (t − 1) / 4)) / 2 = 1, 0.8536, 0.5, 0.1464
    shares = [round_lr(1.0, t, 4, "cosine") for t in (1, 2, 3, 4)]
    assert shares == pytest.approx([1, 0.853553, 0.5, 0.146447], abs=1e-6)
    # lr_min 0.2: 0.2 + 0.8 × the same shares; round 0 (public steps) and constant: lr
    assert round_lr(1.0, 3, 4, "cosine", 0.2) == pytest.approx(0.6)
    assert round_lr(1.0, 0, 4, "cosine", 0.2) == 1.0 and round_lr(0.5, 3, 4) == 0.5


def test_each_round_trains_at_its_scheduled_rate(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    # Prepare: record the rate of every optimizer local training makes
    from fedlora.simulations.cli import main

    seen = []
    make = train_module.make_optimizer
    monkeypatch.setattr(train_module, "make_optimizer",
                        lambda params, cfg: seen.append(cfg.lr) or make(params, cfg))
    job = ["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--num-clients", "2", "--rounds", "3",
           "--local-steps", "1", "--batch-size", "4", "--max-length", "16", "--rank", "2", "--lr", "0.01",
           "--quiet"]
    # Execute
    assert main([*job, "--lr-schedule", "cosine", "--lr-min", "0.001", "--out", str(tmp_path / "c")]) == 0
    # Assert: one pass of both clients a round, at 0.001 + 0.009 (1 + cos(π (t − 1) / 3)) / 2
    assert seen == pytest.approx([0.01, 0.00775, 0.00325])


def test_lr_min_without_the_cosine_schedule_is_refused_in_one_line(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    from fedlora.simulations.cli import main

    assert main(["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--lr-min", "0.001", "--quiet",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr-min is the rate --lr-schedule cosine falls toward" in err[0]
    assert not (tmp_path / "bad").exists()
