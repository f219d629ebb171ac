"""benchmarks/plan_families.py on one family: the toy model it builds, and its table."""

from __future__ import annotations

from tests.benchmarks.bench_scripts import load_script


def test_one_family_s_rows_hold_the_plan_and_the_real_count(tmp_path, capsys):
    # Execute: GPT-2 at toy size, LoRA on its default target and on every linear layer
    study = load_script("plan_families")
    assert study.main(["--families", "gpt2", "--out", str(tmp_path)]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    # Assert: two rows, each planned / kept as printed from its two sizes, within the planner's 20%
    assert [r[1] for r in rows] == ["q/v", "all-linear"] and (tmp_path / "gpt2" / "config.json").is_file()
    for row in rows:
        planned, kept = (float(v.split()[0]) for v in row[2:4])
        assert abs(float(row[4].strip(" |")) - planned / kept) < 0.01
        assert 0.8 < planned / kept < 1.2
