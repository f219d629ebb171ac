"""``fedlora-sim --dp sample`` end to end on a tiny model: passes, budgets, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedlora.privacy.accounting import spent
from fedlora.simulations.cli import main

pytestmark = pytest.mark.slow

# 144 training rows over 3 IID clients: 48 each, so q = 4 / 48 per client
Q = 4 / 48


def _job(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--num-clients", "3",
            "--rounds", "3", "--local-steps", "3", "--batch-size", "4", "--rank", "4",
            "--max-length", "16", "--quiet", "--dp", "sample", "--delta", "1e-3", *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dp_clients_batched_equal_one_per_pass(tiny_bert_dir, tiny_csv, tmp_path):
    # Execute: the same DP job (noise keyed to the seed) with all 3 clients in one pass,
    # one client per pass, one client at a time through Opacus, and with the default secret noise
    assert main(_job(tiny_bert_dir, tiny_csv, tmp_path / "one", "--epsilon", "8", "--dp-reproducible")) == 0
    assert main(_job(tiny_bert_dir, tiny_csv, tmp_path / "per", "--epsilon", "8", "--dp-reproducible",
                     "--max-clients-per-pass", "1")) == 0
    assert main(_job(tiny_bert_dir, tiny_csv, tmp_path / "opacus", "--epsilon", "8", "--dp-reproducible",
                     "--dp-backend", "opacus")) == 0
    assert main(_job(tiny_bert_dir, tiny_csv, tmp_path / "secret", "--epsilon", "8")) == 0
    # Assert: each client's Poisson batches and noise are its own: same adapter, batched or
    # not, fedlora's DP-SGD or Opacus' (GradSampleModule collects the per-example gradients from
    # fedlora's grad samplers registered with it; Opacus' DPOptimizer clips, sums and noises)
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    for other in ("per", "opacus"):
        b = load_file(tmp_path / other / "adapter" / "adapter_model.safetensors")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    # secret noise and batches: not the seed's (nobody who knows --seed can regenerate them)
    c = load_file(tmp_path / "secret" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.allclose(a[k], c[k]) for k in a)
    # and the budget is spent exactly by the planned 9 steps: ε ≤ 8, close to it
    last = _rows(tmp_path / "one")[-1]
    assert last["dp"] == "sample" and len(last["epsilon_per_client"]) == 3
    assert last["dp_backend"] == "fedlora" and _rows(tmp_path / "opacus")[-1]["dp_backend"] == "opacus"
    assert 7.9 <= last["epsilon"] <= 8.0


def test_budget_stops_training(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    # Prepare: a fixed σ = 1 and a budget of ε = 1.5: 5 steps fit (ε 1.488), a 6th does not (1.561);
    # the model scored only after the last round (--eval-every 0)
    out = tmp_path / "run"
    # Execute
    code = main(_job(tiny_bert_dir, tiny_csv, out, "--epsilon", "1.5", "--noise-multiplier", "1.0",
                     "--eval-every", "0"))
    # Assert: round 1 takes 3 steps, round 2 only 2, then the run stops before round 3
    rows = _rows(out)
    assert code == 0 and [r["round"] for r in rows] == [0, 1, 2]
    # round 2 is the run's last though --rounds is 3: it is the one scored
    assert [r["accuracy"] is None for r in rows] == [True, True, False]
    assert rows[1]["epsilon_per_client"] == [pytest.approx(spent(1.0, Q, 3, 1e-3), abs=1e-4)] * 3
    assert rows[2]["epsilon_per_client"] == [pytest.approx(spent(1.0, Q, 5, 1e-3), abs=1e-4)] * 3
    assert max(rows[2]["epsilon_per_client"]) <= 1.5
    assert "spent its privacy budget" in capsys.readouterr().err


@pytest.mark.parametrize("init,steps", [("sketch", 4), ("dense", 2)])
def test_fed_sb_initialisation_is_counted_in_the_budget(tiny_bert_dir, tiny_csv, tmp_path, init, steps):
    # Execute: each initialisation phase (2 batches each; the sketch has 2 phases, the dense
    # gradient 1) is privatised like training steps
    out = tmp_path / "sb"
    assert main(_job(tiny_bert_dir, tiny_csv, out, "--strategy", "fed-sb", "--epsilon", "1e6",
                     "--noise-multiplier", "1.0", "--rounds", "1", "--strategy-options", f"init={init}")) == 0
    # Assert: round 0 has spent `steps`, round 1 `steps` + 3
    rows = _rows(out)
    assert rows[0]["epsilon_per_client"] == [pytest.approx(spent(1.0, Q, steps, 1e-3), abs=1e-4)] * 3
    assert rows[1]["epsilon_per_client"] == [pytest.approx(spent(1.0, Q, steps + 3, 1e-3), abs=1e-4)] * 3


def test_public_fed_sb_initialisation_costs_no_privacy(tiny_bert_dir, tiny_csv, public_csv, tmp_path):
    # Execute: --init-data, a public file: nothing uploaded
    out = tmp_path / "sb"
    assert main(_job(tiny_bert_dir, tiny_csv, out, "--strategy", "fed-sb", "--epsilon", "1e6",
                     "--noise-multiplier", "1.0", "--rounds", "1", "--init-data", str(public_csv))) == 0
    # Assert: round 0 spent nothing and sent nothing; round 1 its 3 steps
    rows = _rows(out)
    assert rows[0]["epsilon_per_client"] == [] and rows[0]["bytes_up"] == 0
    assert rows[1]["epsilon_per_client"] == [pytest.approx(spent(1.0, Q, 3, 1e-3), abs=1e-4)] * 3


@pytest.mark.parametrize("extra,words", [
    (["--epsilon", "0"], "needs a budget"),
    (["--epsilon", "8", "--delta", "0.05"], "smaller than"),
    (["--epsilon", "0.5", "--noise-multiplier", "0.3", "--strategy", "fed-sb"], "initialisation"),
    (["--epsilon", "0.5", "--noise-multiplier", "0.3", "--strategy", "fed-sb", "--dp", "client",
      "--update-clip", "1"], "initialisation"),
    (["--epsilon", "8", "--clip-quantile", "0.5"], "--init-data FILE"),
    (["--epsilon", "8", "--clip-quantile", "0.5", "--head", "public", "--init-data", "TINY_CSV",
      "--max-grad-norm", "1"], "without --max-grad-norm"),
    (["--epsilon", "8", "--clip-quantile", "1.5", "--head", "public", "--init-data", "TINY_CSV"], "(0, 1]"),
])
def test_dp_refusals_are_one_line(tiny_bert_dir, tiny_csv, tmp_path, capsys, extra, words):
    args = [a for a in _job(tiny_bert_dir, tiny_csv, tmp_path / "x") if a not in ("--delta", "1e-3")]
    code = main([*args, *[str(tiny_csv) if a == "TINY_CSV" else a for a in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0]
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_the_clip_measured_on_the_public_file_is_the_one_the_clients_clip_to(tiny_bert_dir, tiny_csv,
                                                                            public_csv, tmp_path):
    # Execute: --init-data and no --max-grad-norm (the clip is the median per-example norm on the
    # public file), the same job with that clip given, and with --clip-quantile 1 (the largest norm)
    public = ["--epsilon", "8", "--dp-reproducible", "--rounds", "2", "--head", "public",
              "--init-data", str(public_csv)]
    assert main(_job(tiny_bert_dir, tiny_csv, tmp_path / "median", *public)) == 0
    clip = _rows(tmp_path / "median")[0]["max_grad_norm"]
    given = ["--max-grad-norm", repr(clip)]
    assert main(_job(tiny_bert_dir, tiny_csv, tmp_path / "given", *public, *given)) == 0
    assert main(_job(tiny_bert_dir, tiny_csv, tmp_path / "top", *public, "--clip-quantile", "1")) == 0
    # Assert: every row reports the measured clip; it is not the recipe's fixed 0.1; clipping to it
    # trains the adapter that clipping to the same value given by hand does; the largest norm is above
    # the median; a job with a clip given reports it
    assert [r["max_grad_norm"] for r in _rows(tmp_path / "median")] == [clip] * 3 and clip != 0.1
    a = load_file(tmp_path / "median" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "given" / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k])
    assert _rows(tmp_path / "top")[0]["max_grad_norm"] > clip
    assert _rows(tmp_path / "given")[0]["max_grad_norm"] == clip


def _head(out):
    from safetensors.torch import load_file

    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in got.items() if "classifier" in k}


def test_head_options(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: the same one-round job with each --head, and DP-SGD with a frozen and the default head
    base = [a for a in _job(tiny_bert_dir, tiny_csv, tmp_path / "x") if a not in ("--dp", "sample")]
    base = [*base, "--rounds", "1"]
    private = ["--dp", "sample", "--epsilon", "50"]

    def run(name, *extra):
        out = tmp_path / name
        assert main([*[a if a != str(tmp_path / "x") else str(out) for a in base], *extra]) == 0
        return _head(out)

    # Execute
    frozen, frozen2 = run("frozen", "--head", "frozen"), run("frozen2", "--head", "frozen", "--seed", "0")
    trained, zero, default = run("train", "--head", "train"), run("zero", "--head", "zero"), run("default")
    public = run("public", "--head", "public", "--init-data", str(tiny_csv))
    public_sgd = run("public-sgd", "--head", "public", "--init-data", str(tiny_csv), "--optimizer", "sgd",
                     "--lr", "0.5")
    private_frozen = run("dp-frozen", *private, "--head", "frozen")
    private_default = run("dp-default", *private)
    # Assert: a frozen head is the model's initial one (the same in two runs, and under DP-SGD: a
    # frozen head gets no noise) and differs from a trained one; a zero-initialised head trained away
    # from zero; the public one moved from the initial head before round 1 and is not the frozen one
    assert frozen.keys() == trained.keys() and frozen
    for k in frozen:
        torch.testing.assert_close(frozen[k], frozen2[k])
        torch.testing.assert_close(private_frozen[k], frozen[k])
        assert not torch.equal(frozen[k], trained[k])
        assert not torch.equal(public[k], frozen[k])
        # the public head is a linear probe with its own optimizer and lr, whatever the clients use
        torch.testing.assert_close(public_sgd[k], public[k])
    assert any(zero[k].abs().max() > 0 for k in zero)
    # without --head: trained, but frozen under --dp sample (the DP recipe's default)
    for k in frozen:
        torch.testing.assert_close(default[k], trained[k])
        torch.testing.assert_close(private_default[k], frozen[k])
