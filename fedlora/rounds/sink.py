"""Where a run's results go: its output folder.

A :class:`RunFolder` is the round loop's sink. It writes ``config.json`` and an empty
``metrics.jsonl`` when a run starts (or rewrites ``metrics.jsonl`` from a checkpoint's rows when it
resumes), and commits every round: one JSON line in ``metrics.jsonl``, then, where the run can be
resumed (``fedlora-server``), the coordinator's checkpoint; ``status.json`` says whether the run is
``running``, ``finished`` or ``failed`` (with the reason) for whoever follows it from outside. With
``--track``, every committed row also goes to the job's experiment trackers (:mod:`fedlora.rounds.tracking`),
which the run's owner ends with the run's artifacts (:meth:`Tracking.finish`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from fedlora.job.paths import recorded
from fedlora.job.schema import JobConfig
from fedlora.rounds.checkpoint import CHECKPOINT, LEGACY_CHECKPOINT
from fedlora.rounds.coordinator import Coordinator
from fedlora.rounds.jsonout import json_line
from fedlora.rounds.tracking import Tracking, clear_untracked


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (a temp file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunFolder:
    """A run's output folder as the loop's sink.

    Parameters
    ----------
    out_dir : Path
        The folder (created if missing).
    checkpoints : bool
        Write the coordinator's checkpoint after every committed round (a resumable run).
    on_round : callable, optional
        Called with every committed row (progress lines, a caller's list).
    tracking : Tracking, optional
        The job's experiment trackers (``--track``): every committed row goes to them too.
    """

    def __init__(self, out_dir: Path, checkpoints: bool = False,
                 on_round: Callable[[dict], None] | None = None, tracking: Tracking | None = None) -> None:
        self.out_dir, self.checkpoints, self.on_round = out_dir, checkpoints, on_round
        self.tracking = tracking
        #: ``folder -> None``: exports the global adapter to the folder, for the rounds ``--save-every``
        #: names (set by the command that knows the model: engine, server app).
        self.export: Callable[[Path], None] | None = None
        out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def begin(self, cfg: JobConfig) -> None:
        """A fresh run: ``config.json``, an empty ``metrics.jsonl``, and nothing left of the adapters or
        checkpoint of a run this one replaces (``--overwrite``): a new run stopped before its end would
        otherwise sit beside the old run's adapter, which its config.json does not describe. So are the
        folders of trackers this run does not use (:func:`~fedlora.rounds.tracking.clear_untracked`)."""
        (self.out_dir / "config.json").write_text(json.dumps(recorded(cfg), indent=2) + "\n")
        self.metrics.write_text("")
        for folder in ("adapters", "adapter"):
            shutil.rmtree(self.out_dir / folder, ignore_errors=True)
        for name in (CHECKPOINT, LEGACY_CHECKPOINT):
            (self.out_dir / name).unlink(missing_ok=True)
        clear_untracked(self.out_dir, cfg.track)

    def resume(self, rows: list[dict]) -> None:
        """A resumed run: ``metrics.jsonl`` holds exactly the checkpoint's rounds (a killed run may
        have written a row after its last checkpoint)."""
        write_atomic(self.metrics, "".join(json_line(r) + "\n" for r in rows))

    def commit(self, row: dict, coord: Coordinator) -> None:
        """One completed round: its row, then its checkpoint."""
        with self.metrics.open("a") as fh:
            fh.write(json_line(row) + "\n")
        if self.checkpoints:
            coord.save(self.out_dir)
        if self.export is not None and coord.cfg.saves(row["round"]):
            self.export(self.out_dir / "adapters" / f"round-{row['round']}")
        if self.tracking is not None:
            self.tracking.log(row)
        if self.on_round is not None:
            self.on_round(row)

    def status(self, state: str, **extra) -> None:
        """``status.json``: ``running``, ``finished`` or ``failed`` (``error``: the reason)."""
        write_atomic(self.out_dir / "status.json", json.dumps({"state": state, **extra}) + "\n")
