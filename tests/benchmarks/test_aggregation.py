"""benchmarks/aggregation.py's strategy selection (the GPU suite leaves FlexLoRA to a part of its own)."""

from __future__ import annotations

import pytest
from bench_scripts import load_script

from fedlora.strategies.registry import STRATEGIES

aggregation = load_script("aggregation")


def test_skip_leaves_out_only_the_named_strategies():
    args = aggregation.parse_args(["--skip", "flexlora,fed-sb"])
    assert args.strategies.split(",") == [s for s in STRATEGIES if s not in ("flexlora", "fed-sb")]
    assert aggregation.parse_args(["--strategies", "fedavg,flora", "--skip", "flora"]).strategies == "fedavg"


def test_an_unknown_skipped_strategy_is_refused():
    with pytest.raises(SystemExit):
        aggregation.parse_args(["--skip", "fedprox"])
