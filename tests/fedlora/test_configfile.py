"""``--config FILE.toml|FILE.json``: a job's fields by their run-config names, flags over them, a finished
run's ``config.json`` rerunning it, and one-line refusals of unknown keys and wrong types."""

from __future__ import annotations

import json

import pytest

from fedlora.job.configfile import parse_args
from fedlora.server.cli import build_parser as server_parser
from fedlora.simulations.cli import build_parser, check_args, to_config
from fedlora.simulations.cli import main as sim


def _job(tmp_path, *argv):
    args = parse_args(build_parser(), [*argv, "--out", str(tmp_path / "out")])
    return to_config(args, device="cpu")


def test_toml_by_run_config_names_with_flags_over_it(tmp_path):
    # Prepare: run-config names and spellings (a list as "4,8", 0 for "the strategy's lr")
    conf = tmp_path / "job.toml"
    conf.write_text('strategy = "flora"\nnum-clients = 4\nrounds = 7\nranks = "4,8"\nlr = 0\n'
                    'target-modules = ["query", "value"]\ndp-reproducible = true\n')
    # Execute
    cfg = _job(tmp_path, "--config", str(conf), "--rounds", "2", "--seed", "3")
    # Assert: the file's fields, the flags' where both are given, defaults elsewhere
    assert (cfg.strategy, cfg.num_clients, cfg.rounds, cfg.seed) == ("flora", 4, 2, 3)
    assert cfg.ranks == [4, 8, 4, 8] and cfg.target_modules == ["query", "value"]
    assert cfg.lr == 2e-3 and cfg.dp_reproducible and cfg.batch_size == 8


def test_json_and_the_server_take_it_too(tmp_path):
    conf = tmp_path / "job.json"
    conf.write_text(json.dumps({"num_clients": 5, "rank": 2, "max_grad_norm": None, "track": []}))
    args = parse_args(server_parser(), ["--config", str(conf), "--insecure", "--rank", "16"])
    assert (args.num_clients, args.rank, args.max_grad_norm, args.track) == (5, 16, None, None)


def test_a_finished_runs_config_json_reruns_the_job(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: a run
    first, again = tmp_path / "x", tmp_path / "y"
    assert sim(["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--out", str(first), "--quiet",
                "--num-clients", "3", "--rounds", "1", "--local-steps", "2", "--batch-size", "4",
                "--rank", "4", "--max-length", "16", "--seed", "5", "--lr", "0.01"]) == 0
    # Execute: its config.json as it is
    assert sim(["--config", str(first / "config.json"), "--out", str(again), "--quiet"]) == 0
    # Assert: the same job and the same rows, but for the clock
    assert (again / "config.json").read_text() == (first / "config.json").read_text()

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert rows(again) == rows(first) and len(rows(first)) == 2


@pytest.mark.parametrize("text, words", [
    ("num_clinets = 3\n", "unknown key 'num_clinets'; did you mean 'num_clients'?"),
    ("local-step = 3\n", "unknown key 'local-step'; did you mean 'local-steps'?"),
    ('rounds = "3"\n', "rounds must be an integer, got '3'"),
    ("lr = true\n", "lr must be a number, got True"),
    ("ranks = [4, 2.5]\n", "ranks must be a list of integers (or null), got [4, 2.5]"),
    ('dp = "yes"\n', "dp must be one of none, sample, client, got 'yes'"),
    ('track = ["neptune"]\n', "track must be one of mlflow, tensorboard, wandb, got 'neptune'"),
    ("rounds = 3\n[x\n", "is not valid TOML"),
])
def test_bad_keys_and_types_are_one_line_and_keep_out(tmp_path, capsys, text, words):
    # Prepare: an earlier run's results in --out
    conf, out = tmp_path / "job.toml", tmp_path / "out"
    conf.write_text(text)
    out.mkdir()
    (out / "metrics.jsonl").write_text("earlier\n")
    # Execute
    code = sim(["--config", str(conf), "--out", str(out), "--overwrite", "--quiet"])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1 and f"--config '{conf}'" in err
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == "earlier\n"


def test_only_toml_and_json(tmp_path, capsys):
    conf = tmp_path / "job.yaml"
    conf.write_text("rounds: 3\n")
    assert sim(["--config", str(conf), "--out", str(tmp_path / "o")]) == 2
    assert "give a .toml or .json file" in capsys.readouterr().err


def test_check_args_sees_the_files_sampling(tmp_path):
    # a config.json's clients-per-round 0 and max-clients-per-pass 0 mean "all" and "automatic"
    conf = tmp_path / "config.json"
    conf.write_text(json.dumps({"clients_per_round": 0, "max_clients_per_pass": 0, "dp_run_id": ""}))
    args = parse_args(build_parser(), ["--config", str(conf), "--out", str(tmp_path / "o")])
    cfg = check_args(args)
    assert (cfg.clients_per_round, cfg.max_clients_per_pass, cfg.dp_run_id) == (0, 0, "")
