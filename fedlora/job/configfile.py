"""``--config FILE.toml|FILE.json``: a job's fields from a file, the flags given beside it overriding them.

Keys are the job's run-config names (``num-clients``, as in ``[tool.flwr.app.config]``) or its field
names (``num_clients``, as in a finished run's ``config.json``, which is therefore accepted as it is:
``fedlora-sim --config runs/x/config.json --out runs/y`` reruns the job). Values are the field's own
type (lists as lists, ``null`` for unset) or its run-config spelling (``ranks = "4,8"``,
``target-modules = "query value"``, ``0`` or ``""`` for "the job's default" where the flag has one).
An unknown key is refused with the closest valid name, a value of the wrong type with the type expected.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fedlora.errors import UserError
from fedlora.job.schema import JobConfig

SUFFIXES = (".toml", ".json")
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def add_config_argument(p: argparse.ArgumentParser) -> None:
    """The ``--config`` flag."""
    p.add_argument("--config", type=Path, default=None, metavar="FILE.toml|FILE.json",
                   help="read the job's fields from this file (run-config names such as num-clients, or"
                        " a finished run's config.json as it is); the flags given beside it override it")


def typed_fields(p: argparse.ArgumentParser, argv: list[str] | None = None) -> set[str]:
    """The destinations of the flags ``argv`` names (a flag given with its default value too)."""
    unset = object()
    blank = argparse.Namespace(**{a.dest: unset for a in p._actions if a.dest != argparse.SUPPRESS})
    return {k for k, v in vars(p.parse_args(argv, namespace=blank)).items() if v is not unset}


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None = None,
               only: tuple[str, ...] | None = None) -> argparse.Namespace:
    """``p.parse_args(argv)``, with ``--config FILE``'s fields as the defaults of their flags; with
    ``only``, the file's other (valid) job fields are left out: a command that reads part of a job
    (``fedlora-eval``) takes a whole run's ``config.json``. ``args.typed`` holds the destinations of
    the flags the command line names (:func:`typed_fields`); a ``--rank`` given there replaces the
    file's per-client ``ranks``, as ``--ranks`` replaces its ``rank``."""
    args = p.parse_args(argv)
    args.typed = typed_fields(p, argv)
    if getattr(args, "config", None) is None:
        return args
    values = read_config(args.config)
    if only is not None:
        values = {name: value for name, value in values.items() if name in only}
    if "rank" in args.typed and "ranks" not in args.typed:
        values.pop("ranks", None)
    defaults = {a.dest: a.default for a in p._actions}
    for name, value in values.items():  # 0, "" or []: "the job's default" where the flag's default is None
        if name in defaults and defaults[name] is None and not isinstance(value, bool) and not value:
            values[name] = None
    p.set_defaults(**values)
    parsed = p.parse_args(argv)
    parsed.typed = args.typed
    return parsed


def read_config(path: Path) -> dict[str, Any]:
    """The job fields of a ``.toml`` or ``.json`` file (field name -> value of the field's type)."""
    if path.suffix not in SUFFIXES:
        raise UserError(f"--config {str(path)!r}: give a .toml or .json file")
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"--config {str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text, object_pairs_hook=_pairs)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--config {str(path)!r} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config {str(path)!r}: expected a table of job fields, got {type(raw).__name__}")
    hints = typing.get_type_hints(JobConfig)
    known = {f.name: f for f in fields(JobConfig)}
    values, spelled = {}, {}
    for key, value in (raw.pairs if isinstance(raw, _Pairs) else raw.items()):
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"--config {str(path)!r}: unknown key {key!r}{_closest(key, known)}")
        if name in values:  # JSON keeps the last of a repeated key, and num_clients is num-clients
            both = f" (as {spelled[name]!r} and {key!r})" if spelled[name] != key else ""
            raise UserError(f"--config {str(path)!r} sets {key!r} twice{both}: keep one")
        spelled[name] = key
        values[name] = convert(f"--config {str(path)!r}", key, value, hints[name],
                               known[name].metadata.get("choices"))
    return values


class _Pairs(dict):
    """A JSON object as read, its repeated keys kept (``pairs``) for :func:`read_config` to refuse."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _pairs(pairs: list[tuple[str, Any]]) -> _Pairs:
    return _Pairs(pairs)


def _closest(key: str, names) -> str:
    """``; did you mean 'NAME'?`` in the key's own spelling (kebab or snake case), or ''."""
    kebab = "-" in key or "_" not in key
    spelled = [n.replace("_", "-") if kebab else n for n in names]
    near = difflib.get_close_matches(key, spelled, n=1)
    return f"; did you mean {near[0]!r}?" if near else "; see --help for the job's fields"


def convert(where: str, key: str, value: Any, hint: Any, choices) -> Any:
    """``value`` as a value of the field's type ``hint``, or a one-line refusal naming the type, which
    starts with ``where`` (``--config 'job.toml'``, ``the run config``)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
    optional = type(None) in args
    kind = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None and optional:
        return None
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        if isinstance(value, str):  # the run config's spelling: "4,8" or "query value"
            with contextlib.suppress(ValueError):  # else refused below, naming the value as written
                value = [item(v) for v in value.replace(",", " ").split()]
        if isinstance(value, list) and all(_is(v, item) for v in value):
            value = [item(v) for v in value]
            _check_choices(where, key, value, choices)
            return value or None
        expected = f"a list of {_TYPE_NAMES[item].removeprefix('an ').removeprefix('a ')}s"
    elif _is(value, kind):
        value = kind(value)
        _check_choices(where, key, [value], choices)
        return value
    else:
        expected = _TYPE_NAMES[kind]
    if optional:
        expected += " (or null)"
    raise UserError(f"{where}: {key} must be {expected}, got {value!r}")


def _is(value: Any, kind: type) -> bool:
    """Whether ``value`` is a ``kind`` as JSON and TOML spell one (an integer is a number too)."""
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_choices(where: str, key: str, values: list, choices) -> None:
    for value in values:
        if choices is not None and value not in choices:
            raise UserError(f"{where}: {key} must be one of {', '.join(map(str, choices))},"
                            f" got {value!r}")
