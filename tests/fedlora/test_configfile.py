"""``--config FILE.toml|FILE.json``: a job's fields by their run-config names, flags over them, a finished
run's ``config.json`` rerunning it, and one-line refusals of unknown keys and wrong types."""

from __future__ import annotations

import json

import pytest

from fedlora.errors import UserError
from fedlora.job.configfile import parse_args, read_config
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
    assert cfg.ranks == [4, 8] and cfg.client_ranks() == [4, 8, 4, 8]
    assert cfg.target_modules == ["query", "value"]
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


def test_a_rank_flag_replaces_the_files_ranks_and_ranks_keep_their_cycle(tmp_path):
    # Prepare: a file with per-client ranks for 2 clients, as a finished run records them
    conf = tmp_path / "job.json"
    conf.write_text(json.dumps({"strategy": "flora", "num_clients": 2, "rank": 8, "ranks": [4, 8, 16]}))
    # Execute / Assert: --rank 16 is every client's rank (the file's ranks were kept and it was ignored)
    cfg = _job(tmp_path, "--config", str(conf), "--rank", "16")
    assert (cfg.rank, cfg.ranks, cfg.client_ranks()) == (16, None, [16, 16])
    # more clients go on with the given cycle 4, 8, 16 (it was stored as [4, 8] for 2 clients)
    cfg = _job(tmp_path, "--config", str(conf), "--num-clients", "5")
    assert cfg.ranks == [4, 8, 16] and cfg.client_ranks() == [4, 8, 16, 4, 8]
    # --ranks beside the file's rank, and both flags at once: the flags' ranks
    assert _job(tmp_path, "--config", str(conf), "--ranks", "2,4").client_ranks() == [2, 4]
    assert _job(tmp_path, "--config", str(conf), "--rank", "2", "--ranks", "4").client_ranks() == [4, 4]


def test_track_takes_names_apart_or_joined_by_commas_as_a_file_does(tmp_path, capsys):
    conf = tmp_path / "job.toml"
    conf.write_text('track = "tensorboard,mlflow"\n')
    joined = _job(tmp_path, "--track", "tensorboard,mlflow").track
    assert joined == _job(tmp_path, "--track", "tensorboard", "mlflow").track == ["tensorboard", "mlflow"]
    assert _job(tmp_path, "--config", str(conf)).track == joined
    with pytest.raises(SystemExit) as exit_:
        _job(tmp_path, "--track", "tensorboard,neptune")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice: 'neptune'" in err and err.count("\n") == 1


def test_config_json_names_the_runs_own_files_from_any_folder(tiny_bert_dir, tiny_csv, tmp_path,
                                                              monkeypatch):
    import shutil

    # Prepare: a run given relative paths in its project folder, and another folder with a file of
    # the same relative name but other rows
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for folder in (project, elsewhere):
        (folder / "data").mkdir(parents=True)
    shutil.copy(tiny_csv, project / "data" / "train.csv")
    lines = tiny_csv.read_text().splitlines()
    (elsewhere / "data" / "train.csv").write_text("\n".join(lines[:1] + lines[1::2]) + "\n")
    monkeypatch.chdir(project)
    flags = ["--model", str(tiny_bert_dir), "--num-clients", "2", "--rounds", "1", "--local-steps", "1",
             "--batch-size", "4", "--rank", "2", "--max-length", "16", "--quiet"]
    assert sim(["--data", "data/train.csv", "--out", "run", *flags]) == 0
    recorded = json.loads((project / "run" / "config.json").read_text())
    # Execute: the run again from the other folder, by its config.json
    monkeypatch.chdir(elsewhere)
    assert sim(["--config", str(project / "run" / "config.json"), "--out", "again", "--quiet"]) == 0
    # Assert: config.json names the project's file (it named data/train.csv, which the rerun read
    # from the other folder), the built-in names stay names, and the rerun scored the same rows
    assert recorded["data"] == str(project / "data" / "train.csv") and recorded["test_data"] == ""
    assert json.loads((elsewhere / "again" / "config.json").read_text()) == recorded

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert rows(elsewhere / "again") == rows(project / "run")


def test_a_resumed_run_may_name_its_files_another_way(tmp_path, monkeypatch):
    from fedlora.job.paths import recorded_value, same_setting
    from fedlora.job.schema import JobConfig

    (tmp_path / "d.csv").write_text("text,label\na,x\n")
    monkeypatch.chdir(tmp_path)
    cfg = JobConfig(data="d.csv", num_clients=4, ranks=[4, 8])
    assert same_setting(cfg, "data", str(tmp_path / "d.csv")) and not same_setting(cfg, "data", "e.csv")
    assert same_setting(cfg, "ranks", [4, 8, 4, 8]) and not same_setting(cfg, "ranks", [8, 4])
    assert [recorded_value("model", "minilm"), recorded_value("data", "bbcnews")] == ["minilm", "bbcnews"]
    assert recorded_value("data", "org/name") == "org/name" and recorded_value("rounds", 3) == 3
    assert recorded_value("data", "*.csv") == str(tmp_path / "*.csv")


@pytest.mark.parametrize("text, words", [
    ("num_clinets = 3\n", "unknown key 'num_clinets'; did you mean 'num_clients'?"),
    ("local-step = 3\n", "unknown key 'local-step'; did you mean 'local-steps'?"),
    ('rounds = "3"\n', "rounds must be an integer, got '3'"),
    ("lr = true\n", "lr must be a number, got True"),
    ("ranks = [4, 2.5]\n", "ranks must be a list of integers (or null), got [4, 2.5]"),
    ('ranks = "4,x"\n', "ranks must be a list of integers (or null), got '4,x'"),  # it said: got None
    ('dp = "yes"\n', "dp must be one of none, sample, client, got 'yes'"),
    ('track = ["neptune"]\n', "track must be one of mlflow, tensorboard, wandb, got 'neptune'"),
    ("rounds = 3\n[x\n", "is not valid TOML"),
    ("num_clients = 3\nnum-clients = 4\n",  # the last one was taken
     "sets 'num-clients' twice (as 'num_clients' and 'num-clients'): keep one"),
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


def test_a_rank_below_one_in_a_file_is_refused_as_the_flag_refuses_it(tmp_path, capsys):
    # Prepare: the flag refuses --ranks 0,8; a file's list was taken, and set_ranks' ValueError
    # traceback came once the job had begun (after --overwrite had replaced the results)
    conf, out = tmp_path / "job.toml", tmp_path / "out"
    conf.write_text('strategy = "flora"\nranks = [0, 8]\n')
    out.mkdir()
    (out / "metrics.jsonl").write_text("earlier\n")
    # Execute
    code = sim(["--config", str(conf), "--out", str(out), "--overwrite", "--quiet"])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and err == "fedlora-sim: error: --ranks takes positive integers, got 0,8\n"
    assert (out / "metrics.jsonl").read_text() == "earlier\n"


def test_a_json_key_given_twice_is_refused_not_the_last_taken(tmp_path):
    conf = tmp_path / "job.json"
    conf.write_text('{"rounds": 3, "lr": 0.1, "rounds": 5}')
    with pytest.raises(UserError, match=r"job.json' sets 'rounds' twice: keep one$"):
        read_config(conf)


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
