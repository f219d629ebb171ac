"""``--track``: every row's numbers read back from the trackers' own files at step = round, the job
config as parameters, the adapter and plots as artifacts, and the one-line refusals."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import pytest

from fedlora.errors import UserError
from fedlora.job.checks import check_job_args
from fedlora.job.schema import JobConfig
from fedlora.rounds.tracking import EXTRA, TRACKERS, Tracking, numeric
from fedlora.simulations.cli import main as sim

HAVE = {name: importlib.util.find_spec(cls.module) is not None for name, cls in TRACKERS.items()}


def _flags(model, data, out, *extra) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--num-clients", "3",
            "--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--rank", "4",
            "--max-length", "16", "--quiet", *extra]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reader: tag -> (step, value) of every scalar in ``logdir``'s event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())


def test_numeric_columns_are_the_rows_numbers_but_the_round():
    row = {"round": 2, "accuracy": 0.5, "bytes_up": 10, "strategy": "fedavg", "agg_error": None,
           "bytes_up_per_client": [5, 5], "budget_spent": True}
    assert numeric(row) == {"accuracy": 0.5, "bytes_up": 10.0}


@pytest.mark.skipif(not (HAVE["tensorboard"] and HAVE["mlflow"]), reason="checked by test_missing_package")
def test_sim_rows_read_back_from_tensorboard_and_mlflow(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    # Prepare
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    # Execute
    assert sim(_flags(tiny_bert_dir, tiny_csv, out, "--track", "tensorboard", "mlflow")) == 0
    rows = _rows(out)
    # Assert: TensorBoard has every numeric column at step = round, with the row's value
    scalars = _scalars(out / "tensorboard")
    assert set(scalars) == set(numeric(rows[0])) | set(numeric(rows[-1]))
    for key in ("accuracy", "loss", "bytes_up", "bytes_down"):
        assert [s for s, _ in scalars[key]] == [0, 1, 2]
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in rows], rel=1e-6)
    # Assert: MLflow's file store: one finished run named after --out, same values, config, adapter
    client = _mlflow(out)
    (exp,) = [e for e in client.search_experiments() if e.name == "fedlora"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["accuracy"]) for r in rows]
    config = json.loads((out / "config.json").read_text())
    assert run.data.params["num_clients"] == "3" and run.data.params["lr"] == str(config["lr"])
    assert run.data.params["track"] == "tensorboard,mlflow"
    files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter/adapter")}
    assert "adapter/adapter/adapter_model.safetensors" in files


def _wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB's log format
    (32 KiB blocks of records: CRC32C, length, type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunks = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record
        elif kind == 0:
            break


@pytest.mark.skipif(not HAVE["mlflow"], reason="checked by test_missing_package")
def test_a_resumed_run_goes_on_in_the_same_mlflow_run(tmp_path):
    # Prepare: a run of rounds 0-1 (a server that was then stopped)
    cfg = JobConfig(track=["mlflow"], seed=3)
    first = Tracking.open(cfg, tmp_path)
    for rnd in (0, 1):
        first.log({"round": rnd, "accuracy": 0.5 + rnd / 10})
    first.close(failed=True)
    # Execute: the resumed server's rounds 2-3, then a new run in the same folder
    resumed = Tracking.open(cfg, tmp_path, fresh=False)
    for rnd in (2, 3):
        resumed.log({"round": rnd, "accuracy": 0.5 + rnd / 10})
    resumed.finish({})
    Tracking.open(cfg, tmp_path).close()
    # Assert: the first run holds every round and finished; the fresh one is another run
    client = _mlflow(tmp_path)
    experiment = client.get_experiment_by_name("fedlora").experiment_id
    runs = client.search_runs([experiment], order_by=["start_time"])
    assert len(runs) == 2
    history = client.get_metric_history(runs[0].info.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8)]
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["seed"] == "3"
    assert json.loads((tmp_path / "tracking.json").read_text())["mlflow/"] == runs[1].info.run_id


@pytest.mark.skipif(not HAVE["tensorboard"], reason="checked by test_missing_package")
def test_a_fresh_run_leaves_nothing_of_the_trackers_of_the_run_it_replaces(tmp_path, monkeypatch):
    from fedlora.rounds.sink import RunFolder

    # Prepare: what an earlier run (a fedlora-compare's, whose events sit in a folder per strategy)
    # left under --out for three trackers, and the run ids kept for its resume
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)

    def earlier():
        for folder in ("tensorboard/fedavg", "mlruns/0", "wandb/offline-run-1"):
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tensorboard/fedavg/events.out.tfevents.1.host").write_bytes(b"old")
        (tmp_path / "tracking.json").write_text('{"mlflow/": "abc"}\n')

    earlier()
    # Execute: a run tracked by TensorBoard replaces it
    cfg = JobConfig(track=["tensorboard"])
    Tracking.open(cfg, tmp_path).close()
    RunFolder(tmp_path).begin(cfg)
    # Assert: its events are the only ones; MLflow's and W&B's folders of the old run are gone
    events = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].count("/") == 1 and _scalars(tmp_path / "tensorboard") == {}
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "wandb").exists()
    assert (tmp_path / "tracking.json").is_file()  # the trackers in use keep their ids there
    # Execute / Assert: an untracked run replaces it all
    earlier()
    RunFolder(tmp_path).begin(JobConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl"]


@pytest.mark.slow  # W&B's service process takes ~10 s to start and stop on 2 cores
@pytest.mark.skipif(not HAVE["wandb"], reason="checked by test_missing_package")
def test_wandb_offline_run_folder_holds_the_rows(tmp_path, monkeypatch):
    # Prepare: not logged in, so offline
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    rows = [{"round": 0, "accuracy": 0.25, "bytes_up": 0}, {"round": 1, "accuracy": 0.75, "bytes_up": 640}]
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    # Execute
    tracking = Tracking.open(JobConfig(track=["wandb"], seed=7), tmp_path)
    for row in rows:
        tracking.log(row)
    tracking.finish({"adapter": [tmp_path / "adapter"]})
    import wandb

    wandb.teardown()  # the service writes the run's file behind the run: wait for it
    # Assert: one offline run folder whose history has each row at its round, and the job config
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    records = list(_wandb_records(next(run.glob("run-*.wandb"))))
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["accuracy"], h["bytes_up"]) for h in history] == [(0, 0.25, 0), (1, 0.75, 640)]
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}
    assert config["seed"] == 7 and config["strategy"] == "fedavg"
    assert any(r.WhichOneof("record_type") == "artifact" for r in records)


@pytest.mark.parametrize("name", sorted(TRACKERS))
def test_missing_package_is_one_line_naming_the_pip_line(name, monkeypatch):
    # Prepare: the package as if absent (the real refusal when it is)
    if HAVE[name]:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda mod, *a: None if mod == TRACKERS[name].module else real(mod, *a))
    # Execute / Assert
    with pytest.raises(UserError, match=rf"--track {name} needs .*{re.escape(EXTRA)}") as err:
        check_job_args(JobConfig(track=[name]))
    assert "\n" not in str(err.value)


def test_unknown_tracker_is_one_line_exit_2(tmp_path, capsys):
    # Execute: a flag, and a run config / config file's job (checked as the flags are)
    with pytest.raises(SystemExit) as exit_:  # argparse's own one-line error
        sim(["--track", "tensorbored", "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="unknown tracker 'neptune' for --track; choose from mlflow"):
        check_job_args(JobConfig(track=["neptune"]))
    # Assert
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice: 'tensorbored'" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not (HAVE["tensorboard"] and HAVE["mlflow"]), reason="checked by test_missing_package")
def test_unwritable_tracking_directory_is_refused_and_out_kept(tiny_bert_dir, tiny_csv, tmp_path, capsys,
                                                               monkeypatch):
    # Prepare: an earlier run's files, where --out/tensorboard is a file; a tracking URI under a file
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("earlier\n")
    (out / "tensorboard").write_text("not a folder")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # Execute
    code_tb = sim(_flags(tiny_bert_dir, tiny_csv, out, "--track", "tensorboard", "--overwrite"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (blocker / "mlruns").as_uri())
    code_ml = sim(_flags(tiny_bert_dir, tiny_csv, tmp_path / "new", "--track", "mlflow"))
    # Assert: one line each, exit 2, nothing in --out replaced or written
    lines = capsys.readouterr().err.splitlines()
    assert code_tb == code_ml == 2 and len(lines) == 2
    assert f"--track tensorboard writes to '{out / 'tensorboard'}'" in lines[0] and "is a file" in lines[0]
    assert "--track mlflow writes to" in lines[1] and f"'{blocker}' is a file" in lines[1]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "tensorboard"]
    assert (out / "metrics.jsonl").read_text() == "earlier\n" and not (tmp_path / "new").exists()


@pytest.mark.skipif(not HAVE["tensorboard"], reason="checked by test_missing_package")
@pytest.mark.parametrize("command", ["fedlora-sim", "fedlora-compare"])
def test_a_job_refused_in_its_setup_leaves_the_earlier_run_and_its_tracker_files(tiny_bert_dir, tiny_csv,
                                                                                 tmp_path, capsys, command):
    from fedlora.simulations.compare import main as compare

    # Prepare: an earlier run's files (a comparison's: its tables and a run folder), TensorBoard's included
    out = tmp_path / "run"
    run = out / "fedavg" if command == "fedlora-compare" else out
    board = out / "tensorboard"
    files = [run / "metrics.jsonl", run / "config.json", board / "fedavg" / "events.out.tfevents.1",
             board / "events.out.tfevents.2", out / "comparison.md", out / "comparison.csv"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"earlier {f.name}\n")
    # Execute: --overwrite, and a text column the data lacks (refused when the job reads its data)
    main = compare if command == "fedlora-compare" else sim
    extra = ("--strategies", "fedavg") if command == "fedlora-compare" else ()
    code = main(_flags(tiny_bert_dir, tiny_csv, out, "--track", "tensorboard", "--overwrite", "--text-column",
                       "nope", *extra))
    # Assert: one line, exit 2, every file as it was (the trackers' were cleared before the data was read)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "text column 'nope'" in err[0]
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(files)
    assert all(f.read_text() == f"earlier {f.name}\n" for f in files)


@pytest.mark.slow
@pytest.mark.skipif(not (HAVE["tensorboard"] and HAVE["mlflow"]), reason="checked by test_missing_package")
def test_compare_logs_each_strategy_as_its_own_run(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    from fedlora.simulations.compare import main as compare

    # Prepare
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "cmp"
    flags = _flags(tiny_bert_dir, tiny_csv, out, "--strategies", "fedavg,flora", "--track", "mlflow",
                   "tensorboard")
    # Execute
    assert compare(flags) == 0
    # Assert: one experiment named after --out, a finished run per strategy with its own rows and the plots
    client = _mlflow(out)
    (exp,) = [e for e in client.search_experiments() if e.name == "cmp"]
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"fedavg", "flora"}
    for label, run in runs.items():
        rows = _rows(out / label)
        assert run.info.status == "FINISHED" and run.data.params["strategy"] == label
        history = client.get_metric_history(run.info.run_id, "accuracy")
        assert [(m.step, m.value) for m in history] == [(r["round"], r["accuracy"]) for r in rows]
        plots = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "plots")}
        assert "accuracy_vs_bytes.png" in plots
        scalars = _scalars(out / "tensorboard" / label)
        assert [v for _, v in scalars["bytes_up"]] == pytest.approx([r["bytes_up"] for r in rows], rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE["tensorboard"], reason="checked by test_missing_package")
def test_server_rounds_are_tracked_by_the_serverapp(tiny_bert_dir, tiny_csv, tmp_path):
    from fedlora.server.app import run_server
    from fedlora.simulations.cli import build_parser, to_config
    from tests.server.local_grid import LocalGrid, deployment_run_config

    # Prepare: the run config fedlora-server submits (--track travels in it)
    flags = _flags(tiny_bert_dir, tiny_csv, tmp_path / "x", "--num-clients", "2", "--track", "tensorboard")
    out = tmp_path / "server"
    rc = deployment_run_config(to_config(build_parser().parse_args(flags)), out)
    # Execute: the real ServerApp and ClientApps over an in-memory grid
    run_server(LocalGrid(rc, 2), rc)
    # Assert
    rows = _rows(out)
    scalars = _scalars(out / "tensorboard")
    assert rc["track"] == "tensorboard" and [s for s, _ in scalars["accuracy"]] == [0, 1, 2]
    assert [v for _, v in scalars["accuracy"]] == pytest.approx([r["accuracy"] for r in rows], rel=1e-6)
