"""Experiment trackers (``--track tensorboard mlflow wandb``): what the run's sink also sends them.

A :class:`Tracking` holds the job's trackers, one run each; :class:`~fedlora.rounds.sink.RunFolder`
(the output folder of every engine: the simulator and the ServerApp) logs every committed row to it
and closes it, with the adapter (and ``fedlora-compare``'s plots) as artifacts where the tracker has
artifacts. Every tracker works offline:

- TensorBoard writes event files under ``--out`` (``tensorboard/``); every numeric column of a row is a
  scalar at step = round, the job config its hyperparameters (and a text summary);
- MLflow logs to ``MLFLOW_TRACKING_URI`` when it is set, else to a local file store ``--out/mlruns``;
- W&B runs offline (``--out/wandb``) unless it is logged in (``WANDB_API_KEY`` or ``wandb login``) or
  ``WANDB_MODE`` says otherwise.

The packages are optional (``pip install -e '.[track]'``): :meth:`Tracker.missing` is the one-line
refusal of a job that names a tracker whose package is absent.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlparse

if TYPE_CHECKING:
    from fedlora.job.schema import JobConfig

EXTRA = "pip install -e '.[track]'"


def numeric(row: dict) -> dict[str, float]:
    """A row's numeric columns (no booleans, lists or None), the round itself left out: the step."""
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)}


def params(cfg: JobConfig) -> dict[str, str | int | float | bool]:
    """The job config as tracker parameters: scalars, lists joined by commas, None as ''."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in asdict(cfg).items():
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        out[key] = "" if value is None else value
    return out


@dataclass
class RunSpec:
    """Where and as what a job's run is tracked.

    Attributes
    ----------
    root : Path
        The folder under which the trackers write (``--out``).
    experiment : str
        The experiment (MLflow) or project (W&B) the run belongs to.
    run : str
        The run's name.
    subdir : str or None
        A folder of the run's own under the tracker's directory (``fedlora-compare``: one per strategy).
    fresh : bool
        A new run (its TensorBoard folder's earlier event files, from a replaced run, are removed);
        False: a resumed one (a resumed ``fedlora-server``), whose events go on in the same run: the
        MLflow run and the W&B run id recorded in ``ROOT/tracking.json`` (:meth:`recorded`).
    config : dict
        The job config (:func:`params`).
    """

    root: Path
    experiment: str
    run: str
    subdir: str | None
    fresh: bool
    config: dict

    @property
    def ids(self) -> Path:
        """The run ids the trackers that have them recorded (``ROOT/tracking.json``)."""
        return self.root / "tracking.json"

    def recorded(self, tracker: str) -> str | None:
        """A resumed run's id in ``tracker`` (None: a fresh run, or none recorded)."""
        if self.fresh or not self.ids.is_file():
            return None
        return json.loads(self.ids.read_text()).get(f"{tracker}/{self.subdir or ''}")

    def record(self, tracker: str, run_id: str) -> None:
        """Keep ``run_id`` for a resumed run of this job."""
        known = json.loads(self.ids.read_text()) if self.ids.is_file() else {}
        known[f"{tracker}/{self.subdir or ''}"] = run_id
        self.ids.write_text(json.dumps(known, indent=1) + "\n")


class Tracker:
    """One experiment tracker's run of :class:`RunSpec`."""

    name: ClassVar[str]
    module: ClassVar[str]  # the import that must be found
    pip: ClassVar[str]  # what pip installs

    @classmethod
    def missing(cls) -> str | None:
        """The one-line refusal when the tracker's package is not installed, else None."""
        if importlib.util.find_spec(cls.module) is not None:
            return None
        return f"--track {cls.name} needs the {cls.pip} package: {EXTRA} (or pip install {cls.pip})"

    @classmethod
    def directory(cls, root: Path) -> Path | None:
        """Where the tracker writes for a job whose output folder is ``root`` (None: not on this disk)."""
        return root / cls.name

    def __init__(self, spec: RunSpec) -> None:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One row's numeric columns at ``step`` (the round)."""
        raise NotImplementedError

    def artifacts(self, kind: str, paths: list[Path]) -> None:
        """Files or folders kept with the run under ``kind`` (``adapter``, ``plots``); default: none."""

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    """Event files in ``ROOT/tensorboard`` (``/SUBDIR``); no artifacts."""

    name, module, pip = "tensorboard", "tensorboard", "tensorboard"

    def __init__(self, spec) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        logdir = self.directory(spec.root) / (spec.subdir or "")
        if spec.fresh:  # a replaced run's events would mix with this one's at the same steps; a
            # job's own folder holds no other run's, a fedlora-compare run's only its own
            for old in logdir.glob(("" if spec.subdir else "**/") + "events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(logdir))
        for summary in hparams(spec.config, {}):  # the HParams tab's columns
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(spec.config, indent=2) + "\n```")

    def log(self, metrics, step) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # watchable while the run goes on

    def close(self, failed) -> None:
        self.writer.close()


class MLflow(Tracker):
    """A run in ``MLFLOW_TRACKING_URI``, else in the file store ``ROOT/mlruns``."""

    name, module, pip = "mlflow", "mlflow", "mlflow-skinny"

    @classmethod
    def uri(cls, root: Path) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or (root / "mlruns").resolve().as_uri()

    @classmethod
    def directory(cls, root: Path) -> Path | None:
        uri = cls.uri(root)
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            return Path(parsed.path)
        return Path(uri) if not parsed.scheme else None  # a plain path, else a server or a database

    def __init__(self, spec) -> None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to files
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri(spec.root))
        self.run_id = self._resumed(spec.recorded(self.name))
        if self.run_id is None:
            found = self.client.get_experiment_by_name(spec.experiment)
            exp = found.experiment_id if found is not None else self.client.create_experiment(spec.experiment)
            self.run_id = self.client.create_run(exp, run_name=spec.run).info.run_id
            values = [Param(k, str(v)[:6000]) for k, v in spec.config.items()]
            self.client.log_batch(self.run_id, params=values)
            spec.record(self.name, self.run_id)

    def _resumed(self, run_id: str | None) -> str | None:
        """``run_id``, running again, when the store still has it (else None: a new run)."""
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:
            return None
        return run_id

    def log(self, metrics, step) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def artifacts(self, kind, paths) -> None:
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), f"{kind}/{path.name}")
            else:
                self.client.log_artifact(self.run_id, str(path), kind)

    def close(self, failed) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _wandb_logged_in() -> bool:
    """An API key in the environment or in ``~/.netrc`` (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandB(Tracker):
    """A W&B run under ``ROOT/wandb`` (``WANDB_DIR``), offline unless logged in."""

    name, module, pip = "wandb", "wandb", "wandb"

    @classmethod
    def directory(cls, root: Path) -> Path | None:
        return Path(os.environ.get("WANDB_DIR") or root) / "wandb"

    def __init__(self, spec) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        where = self.directory(spec.root)
        where.mkdir(parents=True, exist_ok=True)
        run_id = spec.recorded(self.name)  # a resumed run goes on under its id (synced into one run)
        self.run = wandb.init(project=spec.experiment, name=spec.run, dir=str(where.parent), mode=mode,
                              config=spec.config, reinit="create_new", id=run_id,
                              resume="allow" if run_id else None,
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        spec.record(self.name, self.run.id)

    def log(self, metrics, step) -> None:
        self.run.log(metrics, step=step)

    def artifacts(self, kind, paths) -> None:
        import wandb

        art = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.run.name}-{kind}"), type=kind)
        for path in paths:
            if path.is_dir():
                art.add_dir(str(path), name=path.name)
            else:
                art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self, failed) -> None:
        self.run.finish(exit_code=1 if failed else 0)


#: The trackers ``--track`` names.
TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoard, MLflow, WandB)}


def clear_untracked(root: Path, track: list[str] | None) -> None:
    """A fresh run in output folder ``root`` (replacing an earlier one, ``--overwrite``): the folders
    that trackers it does not use wrote there for the earlier run are removed, and with none in use
    the run ids kept for a resume (``tracking.json``). The trackers it uses replace their own."""
    for name, tracker in TRACKERS.items():
        where = tracker.directory(root)
        if name not in (track or []) and where is not None and where.parent.resolve() == root.resolve():
            shutil.rmtree(where, ignore_errors=True)
    if not track:
        (root / "tracking.json").unlink(missing_ok=True)


class Tracking:
    """The job's trackers, one run each, fed by the sink.

    Parameters
    ----------
    trackers : list of Tracker
        Open runs.
    """

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self.seconds = 0.0  # spent in the trackers (benchmarks/tracking.py)

    @classmethod
    def open(cls, cfg: JobConfig, root: Path, run: str | None = None, subdir: str | None = None,
             experiment: str = "fedlora", fresh: bool = True) -> Tracking | None:
        """A run in each of ``cfg.track`` for the job writing to ``root`` (None: no tracker).

        ``run``: the run's name (default: ``root``'s); ``subdir``: its own folder under each tracker's
        directory (``fedlora-compare``: one per strategy; default: the tracker's directory itself);
        ``fresh``: see :class:`RunSpec`.
        """
        names = list(dict.fromkeys(cfg.track or []))
        if not names:
            return None
        t0 = time.perf_counter()
        spec, opened = RunSpec(root, experiment, run or root.resolve().name, subdir, fresh, params(cfg)), []
        try:
            for name in names:
                opened.append(TRACKERS[name](spec))
        except BaseException:
            cls(opened).close(failed=True)
            raise
        tracking = cls(opened)
        tracking.seconds = time.perf_counter() - t0
        return tracking

    def log(self, row: dict) -> None:
        """A committed row's numeric columns at step = its round."""
        t0 = time.perf_counter()
        metrics = numeric(row)
        for tracker in self.trackers:
            tracker.log(metrics, int(row["round"]))
        self.seconds += time.perf_counter() - t0

    def artifacts(self, kind: str, paths: list[Path]) -> None:
        t0 = time.perf_counter()
        for tracker in self.trackers:
            tracker.artifacts(kind, [Path(p) for p in paths])
        self.seconds += time.perf_counter() - t0

    def finish(self, artifacts: dict[str, list[Path]]) -> None:
        """A finished run: ``artifacts`` (kind -> files or folders, e.g. ``adapter``) kept, then every
        run ended."""
        try:
            for kind, paths in artifacts.items():
                self.artifacts(kind, paths)
        except BaseException:
            self.close(failed=True)
            raise
        self.close()

    def close(self, failed: bool = False) -> None:
        """End every run (``failed``: marked so where the tracker can)."""
        t0 = time.perf_counter()
        for tracker in self.trackers:
            tracker.close(failed)
        self.trackers = []
        self.seconds += time.perf_counter() - t0
