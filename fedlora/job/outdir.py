"""One-line refusals about a run's output folder: a fresh run's (``--out``, ``--track``'s directory)
and a resumed one's (``--resume``: the same job, its data unchanged, its DP rounds as planned).

Each check raises a :class:`~fedlora.errors.UserError` whose message says what is wrong and how to
fix it, before anything in the folder is touched.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from fedlora.errors import UserError
from fedlora.job.flags import flag_name
from fedlora.job.paths import data_digests, same_setting
from fedlora.job.schema import JobConfig
from fedlora.rounds.checkpoint import find_checkpoint, load_checkpoint
from fedlora.rounds.tracking import TRACKERS


def check_track_dir(args, out: Path) -> None:
    """Refuse a ``--track`` job whose tracker could not write its directory (for output folder ``out``)."""
    for name in getattr(args, "track", None) or []:
        where = TRACKERS[name].directory(out)
        if where is None:  # a tracking server or database: the tracker's own errors
            continue
        path = where.resolve()
        while not path.exists():
            path = path.parent
        if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
            why = "is a file" if not path.is_dir() else "is not writable"
            raise UserError(f"--track {name} writes to {str(where)!r}, and {str(path)!r} {why}: choose"
                            " another --out (or the tracker's own location) or fix the permissions")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, a folder that cannot be made (a file or an unwritable folder on its path), or an
    existing non-empty folder unless ``overwrite`` (naming ``--resume`` where a stopped run's
    checkpoint is there)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; pass a folder")
    above = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        why = "is a file" if not above.is_dir() else "is not writable"
        raise UserError(f"--out {str(out)!r} cannot be made: {str(above)!r} {why}; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        stopped = (out / "checkpoint.safetensors").is_file()
        raise UserError(f"--out {str(out)!r} already has results; pass"
                        f"{' --resume to continue it from its checkpoint,' if stopped else ''} --overwrite to"
                        " replace them or choose another folder")


#: Job fields a resumed run may change: how far it goes (not under DP: :func:`check_private_rounds`),
#: where it runs, what it reports and saves.
RESUME_MAY_CHANGE = ("rounds", "device", "eval_every", "save_every", "track", "eval_batch_size",
                     "max_clients_per_pass")


def check_resume(cfg: JobConfig, out: Path) -> int:
    """The last round of the stopped run in ``out``. Refuses ``--resume`` without a checkpoint there,
    one whose job differs from ``cfg`` (but in :data:`RESUME_MAY_CHANGE`), or one already past
    ``cfg.rounds``, in one line each."""
    found = find_checkpoint(out) if out.is_dir() else None
    if found is None:
        raise UserError(f"--resume: {str(out)!r} holds no checkpoint of a run (fedlora-sim writes one after"
                        " every round unless --no-checkpoint); run without --resume")
    blob = load_checkpoint(found, keys=("config", "round", "data"))
    saved = blob["config"]
    for name, value in asdict(cfg).items():
        if name not in RESUME_MAY_CHANGE and name in saved and not same_setting(cfg, name, saved[name]):
            raise UserError(f"--resume: the stopped run's {flag_name(name)} was {saved[name]!r}, not"
                            f" {value!r}; resume with the run's own flags (--config {out / 'config.json'})")
    check_private_rounds(cfg, saved.get("rounds", cfg.rounds))
    check_data_unchanged(cfg, blob.get("data") or {})
    if blob["round"] > cfg.rounds:
        raise UserError(f"--resume: the run in {str(out)!r} is past round {cfg.rounds} already (round"
                        f" {blob['round']}); pass --rounds {blob['round']} or more")
    return blob["round"]


def check_data_unchanged(cfg: JobConfig, saved: dict[str, str]) -> None:
    """Refuse to resume a run whose data files (``saved``: their digests at its checkpoint,
    :func:`~fedlora.job.paths.data_digests`; none in an older fedlora's) have changed since: its
    clients' partitions, held-out set and labels would change between rounds."""
    now = data_digests(cfg) if saved else {}
    for name, digest in saved.items():
        if now.get(name) != digest:
            raise UserError(f"--resume: {flag_name(name)} {getattr(cfg, name)!r} has changed since the"
                            " stopped run read it (its checkpoint recorded other contents): resume with the"
                            " data as it was, or start a new run (--overwrite)")


def check_private_rounds(cfg: JobConfig, planned: int) -> None:
    """Refuse a resumed DP run whose ``--rounds`` differs from the stopped run's ``planned``: its noise
    multiplier was calibrated so that ``planned`` rounds spend ε, and another count would calibrate
    another σ for the rounds left while the accountant composes one σ over them all."""
    if cfg.dp != "none" and cfg.rounds != planned:
        rounds = f"{planned} round{'s' if planned != 1 else ''}"
        raise UserError(f"--resume: the stopped run's noise was set so that its {rounds} spend"
                        f" ε = {cfg.epsilon:g} (--dp {cfg.dp}); it cannot go to {cfg.rounds} rounds: resume"
                        f" with --rounds {planned}, or start a new run with a budget for {cfg.rounds}")
