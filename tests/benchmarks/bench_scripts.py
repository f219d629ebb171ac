"""Import a script of ``benchmarks/`` (not a package) as a module, for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str, module_name: str | None = None) -> ModuleType:
    """``benchmarks/NAME.py`` as module ``module_name`` (default ``NAME``), registered in ``sys.modules``
    (dataclasses and pickling look their module up there). ``benchmarks/`` joins the end of
    ``sys.path``, as it is first there when a script runs: the scripts import ``stats`` and ``splits``."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(module_name or name, BENCHMARKS / f"{name}.py")
    module = sys.modules[module_name or name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
