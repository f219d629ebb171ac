"""What a stalled ``fedlora-sim --engine flower`` run was doing: every process it started, with
the Python stacks of each (``py-spy dump``), written beside the run before it is killed.

Flower's Ray engine has stalled now and then on 2-core CI (sessions 18-23): the test kills the
run and runs it again, and this report is what the next person reads to find the cause.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def run_processes(root: int, out: Path) -> list[int]:
    """``root`` and every process below it, plus the processes the SuperLink's executor started in
    sessions of their own (``flwr-simulation`` names the SuperLink's port) and theirs."""
    kids = _children()
    log = out / "superlink.log"
    ports = re.findall(r"API on [\d.]+:(\d+)", log.read_text(errors="ignore")) if log.is_file() else []
    sims = [int(p.name) for p in Path("/proc").glob("[0-9]*") if "flwr-simulation" in _cmdline(int(p.name))]
    tops = [root] + [pid for pid in sims if ports and f":{ports[0]}" in _cmdline(pid)]
    found: list[int] = []
    while tops:
        pid = tops.pop()
        if pid not in found:
            found.append(pid)
            tops.extend(kids.get(pid, []))
    return found


def report(root: int, out: Path, dest: Path) -> Path:
    """Write what every process of the run was doing to ``dest`` (a text file); its path."""
    beside = Path(sys.executable).with_name("py-spy")  # in the test extra
    spy = str(beside) if beside.is_file() else shutil.which("py-spy")
    parts = []
    for pid in run_processes(root, out):
        parts.append(f"===== {pid}: {_cmdline(pid)[:300]}")
        if spy is not None:
            got = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
            parts.append((got.stdout + got.stderr).strip())
    parts.append(ray_tails())
    dest.write_text("\n".join(parts) + "\n")
    return dest


def ray_tails(lines: int = 25) -> str:
    """The last ``lines`` of the newest Ray session's raylet and GCS logs and of its workers' stderr."""
    logs = Path("/tmp/ray/session_latest/logs")
    parts = []
    for path in sorted([*logs.glob("raylet.out"), *logs.glob("gcs_server.out"), *logs.glob("worker-*.err")]):
        text = path.read_text(errors="ignore").splitlines()[-lines:]
        parts.append(f"----- {path.name}\n" + "\n".join(text))
    return "\n".join(parts)
