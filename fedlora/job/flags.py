"""A job as command-line flags: argparse arguments derived from :class:`JobConfig`'s fields, and
the job they parse to."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from dataclasses import MISSING, fields
from typing import Any

from fedlora.job.defaults import fill_defaults, resolve_device
from fedlora.job.schema import GROUPS, JobConfig


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def with_default(text: str, default: Any) -> str:
    """A flag's help with its default at the end, ``rounds (default 3)``, unless the text says its
    default itself, or the flag is required where it is read, or there is none to say (a switch, an
    empty or unset value)."""
    if ("default" in text or "required" in text or default is None or isinstance(default, bool)
            or default in ("", [])):
        return text
    return f"{text} (default {default:g})" if isinstance(default, float) else f"{text} (default {default})"


class Words(argparse.Action):
    """``nargs="+"`` over a closed set of names, given apart or joined by commas (``--track
    tensorboard,mlflow`` as ``--track tensorboard mlflow``, as a config file spells them)."""

    def __init__(self, *args, names: Collection[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.names = names

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        words = [w for value in values for w in value.split(",") if w]
        bad = next((w for w in words if w not in self.names), None)
        if bad is not None or not words:
            parser.error(f"argument {option_string}: invalid choice: {bad or ''!r} (choose from"
                         f" {', '.join(self.names)})")
        setattr(namespace, self.dest, words)


def add_job_arguments(p: argparse.ArgumentParser, *, num_clients_help: str = "clients",
                      only: Collection[str] | None = None) -> None:
    """The job flags of every field with a group (:func:`option`), shared by the CLIs; with ``only``,
    the flags of those fields alone, the others keeping their flags' defaults (a command that reads
    part of a job: ``fedlora-eval``)."""
    groups = {g: p.add_argument_group(g) for g in GROUPS}
    for f in fields(JobConfig):
        meta = f.metadata
        if meta.get("group") is None:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        text = num_clients_help if f.name == "num_clients" else meta["help"]
        kwargs: dict[str, Any] = {"help": with_default(text, default).replace("%", "%%"),  # argparse's %
                                  "default": default if meta["flag_default"] is MISSING
                                  else meta["flag_default"]}
        if only is not None and f.name not in only:
            p.set_defaults(**{f.name: kwargs["default"]})
            continue
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif meta["nargs"] == "+" and meta["choices"] is not None:  # names, apart or joined by commas
            kwargs.update(action=Words, names=meta["choices"], nargs="+", metavar=meta["metavar"])
        else:
            for key in ("choices", "nargs", "metavar"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
            kind = meta["type"] or (type(default) if default is not None else None)
            if kind is not None and meta["nargs"] is None:
                kwargs["type"] = kind
        groups[meta["group"]].add_argument(flag_name(f.name), **kwargs)


def to_config(args: argparse.Namespace, device: str | None = None) -> JobConfig:
    """The :class:`JobConfig` of parsed flags: every field from its flag (a field without
    one in ``args`` keeps its default), then the few that need the job around them."""
    values = {f.name: getattr(args, f.name) for f in fields(JobConfig) if hasattr(args, f.name)}
    values["clients_per_round"] = values.get("clients_per_round") or 0
    values["max_clients_per_pass"] = values.get("max_clients_per_pass") or 0
    fill_defaults(args)
    values.update(batch_size=args.batch_size, lr=args.lr, max_grad_norm=args.max_grad_norm, head=args.head,
                  clip_quantile=args.clip_quantile, max_length=args.max_length,
                  quant_calibration=args.quant_calibration)
    values["device"] = device if device is not None else resolve_device(args.device)
    return JobConfig(**values)


# ---- Flower run config: TOML scalars only, so lists are strings and None is 0 / "" ----

