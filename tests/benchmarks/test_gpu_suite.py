"""The GPU suite: its payload survives the split into carried parts, and its dry run works on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
gpu_suite = load_script("gpu_suite")
PARTS = ["simulation", "aggregation", "dp", "kernels", "pass-size", "smollm2-sft", "smollm2-sft-nf4",
         "smollm2-sft-nf4-qc8", "aggregation-flexlora"]


def test_the_dry_run_has_the_gpu_run_s_parts_in_its_order():
    assert [pt.name for pt in gpu_suite.gpu_parts("lm")] == PARTS
    assert [pt.name for pt in gpu_suite.dry_parts("lm")] == PARTS
    gpu_scripts = [pt.argv[0] for pt in gpu_suite.gpu_parts("lm")]
    assert gpu_scripts == [pt.argv[0] for pt in gpu_suite.dry_parts("lm")]


def split_and_stage(tmp_path: Path, data: bytes, part_bytes: int) -> tuple[list[Path], Path]:
    tar = tmp_path / "payload.tar"
    tar.write_bytes(data)
    folders = gpu_suite.split_payload(tar, tmp_path / ".gpu", part_bytes)
    return folders, tmp_path / "staged"


def test_payload_split_into_parts_joins_back_byte_for_byte(tmp_path):
    data = os.urandom(2500)
    folders, staged = split_and_stage(tmp_path, data, 1000)
    assert [f.name for f in folders] == ["p1", "p2", "p3"]  # 1000 + 1000 + 500 bytes
    assert [len((f / f"payload.{i:03d}").read_bytes()) for i, f in enumerate(folders)] == [1000, 1000, 500]
    assert gpu_suite.stage(tmp_path / ".gpu", staged) == ["manifest.json", "payload.000"] + [
        "manifest.json", "payload.001", "manifest.json", "payload.002"]
    gpu_suite.join_payload(staged, tmp_path / "joined.tar")
    assert (tmp_path / "joined.tar").read_bytes() == data


def test_a_missing_or_damaged_part_is_refused_in_one_line(tmp_path):
    folders, staged = split_and_stage(tmp_path, os.urandom(2500), 1000)
    for f in folders[:2]:  # the last part was not carried
        for item in f.iterdir():
            staged.mkdir(exist_ok=True)
            (staged / item.name).write_bytes(item.read_bytes())
    with pytest.raises(SystemExit, match="payload chunks missing: payload.002"):
        gpu_suite.join_payload(staged, tmp_path / "joined.tar")
    damaged = bytearray((folders[2] / "payload.002").read_bytes())
    damaged[0] ^= 1
    (staged / "payload.002").write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match="payload.002 is damaged"):
        gpu_suite.join_payload(staged, tmp_path / "joined.tar")
    with pytest.raises(SystemExit, match="no payload staged"):
        gpu_suite.join_payload(tmp_path / "nothing", tmp_path / "joined.tar")


@pytest.mark.slow
def test_dry_run_runs_every_part_on_cpu_and_writes_one_markdown_block(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out",
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "gpu_results.md").read_text()
    for name in PARTS:
        assert f"#### {name}: ok" in md, md[-3000:]
    assert "stock est. sequential" in md  # no Ray leg in a dry run: stock Flower from its parts
    assert "fedlora batched" in md and "ms / 1k tokens" in md
    assert md.count("```") == 2 * len(PARTS)
