"""Strategies as plugins: adapter plans, the registry, options from a job, describe()."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedlora.strategies import STRATEGIES, AdapterPlan, Strategy, register_strategy, strategy_class
from fedlora.strategies.base import Option, parse_options


def test_every_strategy_is_registered_from_its_own_file():
    # Assert: the nine strategies, each class defined in the module named after it
    assert set(STRATEGIES) == {"fedavg", "flora", "lora-fair", "fed-sb", "ffa-lora", "fedex-lora",
                               "rolora", "fedsa-lora", "flexlora"}
    for name, cls in STRATEGIES.items():
        assert cls.__module__.rsplit(".", 1)[1] == name.replace("-", "_")


def test_a_new_strategy_is_one_class():
    # Prepare: a plugin declared in a test, as a user's file would
    @register_strategy
    class Frozen(Strategy):
        name = "test-frozen-b"
        adapter_plan = AdapterPlan(train=("A",), upload=("A",), download=("A",), shared=("B",))
        options = {"k": Option(int, 3, "a knob")}

        def __init__(self, k: int = 3) -> None:
            self.k = k

        def aggregate(self, uploads, state):
            raise NotImplementedError
    try:
        # Execute
        got = strategy_class("test-frozen-b").from_job(SimpleNamespace(strategy_options="k=7", seed=0))
        # Assert: registered, its option parsed to its type, its plan declared
        assert got.k == 7 and got.plan(3).train == ("A",) and got.describe()["options"] == {"k": 3}
        with pytest.raises(ValueError, match="two strategies are called"):
            register_strategy(type("Other", (Frozen,), {}))
    finally:
        STRATEGIES.pop("test-frozen-b")


def test_options_from_a_job_and_their_errors():
    # Execute / Assert: lora-fair takes lam; an unknown option names what it takes
    fair = strategy_class("lora-fair").from_job(SimpleNamespace(strategy_options="lam=0.5", seed=0))
    assert fair.lam == 0.5
    sb = strategy_class("fed-sb").from_job(SimpleNamespace(strategy_options="init_lr=0.25", seed=4))
    assert sb.init_lr == 0.25 and sb.seed == 4
    with pytest.raises(ValueError, match=r"unknown option 'lambda' for strategy lora-fair \(it takes: lam\)"):
        strategy_class("lora-fair").from_job(SimpleNamespace(strategy_options="lambda=1", seed=0))
    with pytest.raises(ValueError, match="expected a float"):
        strategy_class("lora-fair").from_job(SimpleNamespace(strategy_options="lam=big", seed=0))
    with pytest.raises(ValueError, match="not NAME=VALUE"):
        parse_options("lam")
    assert parse_options(" lam = 1 , init-lr=2 ") == {"lam": "1", "init_lr": "2"}
    with pytest.raises(ValueError, match="strategy option 'init-lr' is given twice: keep one"):
        parse_options("init_lr=1,lam=2,init-lr=3")  # the last one was taken


@pytest.mark.parametrize("name, options", [("lora-fair", "lam=nan"), ("fed-sb", "init_lr=inf")])
def test_an_option_that_is_not_a_finite_number_is_refused(name, options):
    # they were taken: NaN passed every bound (lam < 0 is false for NaN)
    key = options.split("=")[0]
    with pytest.raises(ValueError, match=f"strategy option {key}='.*': expected a finite number"):
        strategy_class(name).from_job(SimpleNamespace(strategy_options=options, seed=0))


def test_plans_refuse_impossible_combinations():
    with pytest.raises(ValueError, match="do not exist"):
        AdapterPlan(train=("R",))
    with pytest.raises(ValueError, match="cannot also train"):
        AdapterPlan(shared=("A",))
    with pytest.raises(ValueError, match="never uploaded"):
        AdapterPlan(keep=("B",))
    with pytest.raises(ValueError, match="at least one"):
        AdapterPlan(train=())


def test_declarations_of_the_new_strategies():
    # Assert: what each one trains, sends and keeps, and which flags it takes
    ffa, fedsa = STRATEGIES["ffa-lora"].adapter_plan, STRATEGIES["fedsa-lora"].adapter_plan
    assert (ffa.train, ffa.upload, ffa.shared) == (("B",), ("B",), ("A",))
    assert (fedsa.upload, fedsa.download, fedsa.keep) == (("A",), ("A",), ("B",))
    assert STRATEGIES["fed-sb"].adapter_plan.core and STRATEGIES["fed-sb"].default_lr == 1e-2
    sums = {n for n, c in STRATEGIES.items() if c.sum_only}
    assert sums == {"fedavg", "fed-sb", "ffa-lora", "rolora", "fedsa-lora"}
    hetero = {n for n, c in STRATEGIES.items() if c.heterogeneous_ranks}
    assert hetero == {"flora", "flexlora"}
    assert {n for n, c in STRATEGIES.items() if c.folds} == {"flora", "fedex-lora"}


def test_the_readme_example_strategy_works():
    # Prepare: the README's one-file strategy, its relative imports made absolute
    import re
    from pathlib import Path

    import torch

    from fedlora.strategies import ClientUpload, GlobalState

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n(# strategies/my_method.py.*?)```", readme, re.S).group(1)
    code = code.replace("from .", "from fedlora.strategies.")
    try:
        exec(compile(code, "my_method.py", "exec"), {"__name__": "my_method"})
        # Execute: built from a job's options, one round of two clients (p = 1/4, 3/4)
        s = strategy_class("my-method").from_job(SimpleNamespace(strategy_options="beta=0.5", seed=0))
        state = GlobalState(factors={"w": (torch.ones(1, 1), torch.full((1, 1), 2.0))}, scale=1.0)
        ups = [ClientUpload(num_examples=n, factors={"w": (torch.ones(1, 1), torch.full((1, 1), b))})
               for n, b in ((1, 4.0), (3, 8.0))]
        new = s.aggregate(ups, state).state
        # Assert: B = 0.5 · 2 + 0.5 · (4/4 + 24/4) = 4.5; the plan trains B only
        assert float(new.factors["w"][1]) == pytest.approx(4.5)
        assert s.plan(1).train == ("B",) and s.beta == 0.5
    finally:
        STRATEGIES.pop("my-method", None)


def test_every_registered_strategy_has_its_readme_row_with_its_options():
    # Prepare: the README's strategy table, name -> options cell
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text().split("## Quickstart")[0]
    table = re.finditer(r"^\| `([a-z-]+)` \|.*\|([^|]*)\|$", readme, re.M)
    rows = {m.group(1): m.group(2).strip() for m in table}
    # Assert: one row per strategy, listing exactly its options and their defaults
    for name, cls in STRATEGIES.items():
        assert name in rows, f"README has no row for {name}"
        want = sorted(f"`{k}={o.default:g}`" if isinstance(o.default, float) else f"`{k}={o.default}`"
                      for k, o in cls.options.items())
        assert sorted(filter(None, (c.strip() for c in rows[name].split(",")))) == want, name
