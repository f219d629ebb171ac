"""A job as a Flower run config (kebab-case keys, TOML scalars) and as ``config.json``
(``dataclasses.asdict``), with the migration of older ``config.json`` files."""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any

from fedlora.errors import UserError
from fedlora.job.configfile import convert
from fedlora.job.defaults import fill_defaults
from fedlora.job.schema import JobConfig

LEGACY_OPTIONS = {"fair_lambda": ("lora-fair", "lam"), "sb_init_lr": ("fed-sb", "init_lr")}


def from_dict(values: dict[str, Any], where: str = "config.json") -> JobConfig:
    """A :class:`JobConfig` from ``config.json`` (``asdict``; ``where`` names it in refusals): fields of
    older versions that became strategy options are carried over when they apply, and unknown keys and
    values of the wrong type refused (a damaged file's ``rounds = "x"`` was a TypeError later)."""
    if not isinstance(values, dict):
        raise UserError(f"{where} holds no job's settings (got {type(values).__name__}): restore the run's"
                        " config.json, or start a new run")
    values = dict(values)
    for old, (strategy, name) in LEGACY_OPTIONS.items():
        value = values.pop(old, None)
        if value is not None and values.get("strategy") == strategy and not values.get("strategy_options"):
            values["strategy_options"] = f"{name}={value}"
    known = {f.name for f in fields(JobConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{where} has unknown settings {unknown}: it was written by another"
                        " fedlora version")
    hints, known = typing.get_type_hints(JobConfig), {f.name: f for f in fields(JobConfig)}
    return JobConfig(**{key: convert(where, key, value, hints[key], known[key].metadata["choices"])
                        for key, value in values.items()})



OPTIONAL_FLOATS = ("max_grad_norm", "clip_quantile")  # None travels as 0.0
WORD_LISTS = ("target_modules", "track")  # lists of names travel joined by spaces, None as ""

def to_run_config(cfg: JobConfig) -> dict[str, object]:
    """``JobConfig`` as Flower run-config entries (kebab-case keys, TOML scalars)."""
    out: dict[str, object] = {}
    for f in fields(JobConfig):
        value = getattr(cfg, f.name)
        if f.name == "ranks":
            value = ",".join(str(r) for r in value) if value else ""
        elif f.name in WORD_LISTS:
            value = " ".join(value) if value else ""
        elif f.name in OPTIONAL_FLOATS:
            value = 0.0 if value is None else float(value)
        out[f.name.replace("_", "-")] = value
    return out


def from_run_config(run_config: dict[str, object]) -> JobConfig:
    """Inverse of :func:`to_run_config`; unknown keys are ignored, missing ones default, and a value
    of the wrong type or not among the field's choices is refused in one line, as a ``--config``
    file's is (``flwr run . --run-config "secagg='false'"`` was secagg on, ``strategy='x'`` a KeyError)."""
    cfg, hints = JobConfig(), typing.get_type_hints(JobConfig)
    for f in fields(JobConfig):
        key = f.name.replace("_", "-")
        if key not in run_config:
            continue
        value = run_config[key]
        if not (f.name == "head" and value == ""):  # "": the job's default, as below
            value = convert("the run config", key, value, hints[f.name], f.metadata.get("choices"))
        if f.name in OPTIONAL_FLOATS:
            value = value or None
        setattr(cfg, f.name, value)
    # lr 0, batch-size 0, head "": the job's default (the strategy's, or the DP recipe's); a negative
    # one stays, for the job's checks to refuse
    if "lr" in run_config and float(run_config["lr"]) == 0:
        cfg.lr = None
    if cfg.batch_size == 0:
        cfg.batch_size = None
    cfg.head = cfg.head or None
    fill_defaults(cfg)
    return cfg
