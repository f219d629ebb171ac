"""One job, three spellings: flags, Flower run config, and the repo's [tool.flwr.app.config]."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest
import tomllib

from fedlora.errors import UserError
from fedlora.job.checks import check_job_args, warn_unused
from fedlora.job.flags import to_config
from fedlora.job.runconfig import from_dict, from_run_config, to_run_config
from fedlora.job.schema import USED_ONLY_WITH, JobConfig
from fedlora.server.cli import build_parser
from fedlora.server.launch import run_config

ROOT = Path(__file__).resolve().parents[2]


def test_run_config_round_trips_every_field():
    cfg = JobConfig(strategy="flora", ranks=[4, 8, 4], target_modules=["query", "v.*"],
                    max_grad_norm=0.5, lr=3e-4, seed=7)
    assert from_run_config(to_run_config(cfg)) == cfg
    assert from_run_config(to_run_config(JobConfig())) == JobConfig()


def test_zero_lr_means_the_strategy_default():
    assert from_run_config({"strategy": "fed-sb", "lr": 0.0}).lr == 1e-2
    assert from_run_config({"strategy": "fedavg", "lr": 0.0}).lr == 2e-3
    # a negative one is no default: the job's checks refuse it (it ran at the default)
    with pytest.raises(UserError, match="--lr must be > 0, got -1.0"):
        check_job_args(from_run_config({"strategy": "fedavg", "lr": -1.0}))
    with pytest.raises(UserError, match="--batch-size must be ≥ 1, got -4"):
        check_job_args(from_run_config({"batch-size": -4}))


@pytest.mark.parametrize("entry, words", [
    ({"secagg": "false"}, "secagg must be true or false, got 'false'"),  # bool("false"): secagg on
    ({"num-clients": 2.7}, "num-clients must be an integer, got 2.7"),  # int(2.7): 2 clients
    ({"strategy": "flora2"}, "strategy must be one of fed-sb, fedavg,"),  # a KeyError
    ({"rounds": "x"}, "rounds must be an integer, got 'x'"),  # int()'s ValueError, naming no key
    ({"ranks": "4,x"}, "ranks must be a list of integers (or null), got '4,x'"),
])
def test_a_run_config_value_of_the_wrong_type_is_refused_naming_its_key(entry, words):
    # flwr run . --run-config "..." reaches the ServerApp and ClientApp as these
    with pytest.raises(UserError, match="^the run config: " + re.escape(words)):
        from_run_config(entry)


def test_repo_flower_app_config_has_exactly_the_server_keys(tmp_path):
    # Prepare: the keys fedlora-server writes into its generated app
    args = build_parser().parse_args(["--insecure"])
    expected = run_config(to_config(args, device="cpu"), tmp_path)
    # Execute
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    # Assert: same keys, same defaults (but out, and lr, batch-size and head whose 0 or "" mean
    # "the job's default", which --dp sample changes)
    assert set(app["config"]) == set(expected)
    for key, value in app["config"].items():
        if key not in ("out", "lr", "batch-size", "head"):
            assert value == expected[key], key
    got = from_run_config(app["config"])
    assert (got.lr, got.batch_size, got.head) == (2e-3, 8, "train")
    private = from_run_config({**app["config"], "dp": "sample", "epsilon": 8.0})
    assert (private.lr, private.batch_size, private.head, private.max_grad_norm) == (3e-3, 256, "frozen", 0.1)
    assert app["components"] == {"serverapp": "fedlora.server.app:app",
                                 "clientapp": "fedlora.clients.app:app"}


def test_config_json_of_an_older_version_keeps_its_strategy_option():
    # Prepare: a config.json written before strategy options (lora-fair's λ was a field)
    old = asdict(JobConfig(strategy="lora-fair"))
    del old["strategy_options"], old["personal_test_fraction"]
    old.update(fair_lambda=0.05, sb_init_lr=0.001)
    # Execute
    cfg = from_dict(old)
    # Assert: λ carried over as the strategy's option; fed-sb's field dropped (not this strategy)
    assert cfg.strategy_options == "lam=0.05" and cfg.personal_test_fraction == 0.0
    with pytest.raises(UserError, match=r"unknown settings \['colour'\]"):
        from_dict({**asdict(JobConfig()), "colour": "red"})


def test_dp_sample_takes_the_dp_recipe_for_unset_flags():
    # Prepare
    from fedlora.job.defaults import DP_RECIPE

    args = ["--num-clients", "2", "--epsilon", "8", "--dp", "sample"]
    # Execute
    private = to_config(build_parser().parse_args(args), device="cpu")
    plain = to_config(build_parser().parse_args(args[:2]), device="cpu")
    given = to_config(build_parser().parse_args([*args, "--batch-size", "32", "--lr", "1e-3",
                                                  "--max-grad-norm", "0.5"]), device="cpu")
    # Assert: unset flags take the recipe under --dp sample, the usual defaults without it, and
    # a flag given wins
    assert (private.batch_size, private.lr, private.max_grad_norm, private.head) == (
        DP_RECIPE["batch_size"], DP_RECIPE["lr"], DP_RECIPE["max_grad_norm"], DP_RECIPE["head"])
    assert (plain.batch_size, plain.lr, plain.max_grad_norm, plain.head) == (8, 2e-3, None, "train")
    assert (given.batch_size, given.lr, given.max_grad_norm) == (32, 1e-3, 0.5)
    # a public file: its head is trained on it (and the clip measured on it); a head given wins
    public = to_config(build_parser().parse_args([*args, "--init-data", "public.csv"]), device="cpu")
    assert (public.head, public.max_grad_norm) == ("public", None)
    frozen = build_parser().parse_args([*args, "--init-data", "public.csv", "--head", "frozen"])
    assert to_config(frozen, device="cpu").head == "frozen"
    # the Flower run config carries the resolved values; lr 0 there means the same default
    back = from_run_config({**to_run_config(private), "lr": 0.0})
    assert (back.batch_size, back.lr) == (DP_RECIPE["batch_size"], DP_RECIPE["lr"])
    # Fed-SB's DP learning rate (3e-2, chosen on validation) replaces the recipe's
    fed_sb = to_config(build_parser().parse_args([*args, "--strategy", "fed-sb"]), device="cpu")
    assert fed_sb.lr == 3e-2


@pytest.mark.parametrize("module", ["fedlora.simulations.cli", "fedlora.simulations.compare",
                                    "fedlora.server.cli", "fedlora.clients.cli"])
def test_every_cli_prints_its_help(module, capsys):
    # a job flag's help with a bare % ("~30% more time") once broke argparse's --help
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "usage:" in out
    assert ("--secagg" in out) is not module.endswith("clients.cli")  # a job flag, not a client's


def test_a_job_flags_help_ends_with_its_default_unless_it_says_it(capsys):
    # Execute
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse's line breaks undone
    # Assert: the defaults a user could not see (fedlora-server's --num-clients has its own help, and its
    # own flags say theirs); a help that says its default, a required value and a switch get nothing more
    for says in ("federated rounds (default 3)", "clients to wait for and train in each round (default 10)",
                 "LoRA α (scale α / r) (default 16)", "Dirichlet concentration (default 0.5)",
                 "δ; must be below 1/(a client's examples) for --dp sample, 1/(clients) for client (default"
                 " 1e-05)", "aggregation strategy (default fedavg)", "HTTP(S) port (default 8000)",
                 "in a round (default 600)", "output folder (default runs/server)"):
        assert says in out
    assert "tokens per example (default 64; --task sft: derived" in out and "and printed) (default" not in out
    assert "privacy budget ε (required with --dp) --delta" in out
    assert "the client's next upload (default" not in out  # --no-error-feedback, a switch


@pytest.mark.parametrize("field", ["lr", "lora_alpha", "lora_dropout", "weight_decay", "alpha", "norm_bound",
                                   "server_lr", "epsilon", "update_clip", "max_grad_norm", "secagg_range"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_that_is_not_finite_is_refused_naming_its_flag(field, value):
    # NaN passed every range check (a comparison with NaN is false): --lr nan and --lora-alpha nan
    # failed with a traceback after the job had replaced an --overwrite folder's results
    flag = "--" + field.replace("_", "-")
    with pytest.raises(UserError, match=f"^{flag} must be a finite number, got {value}: pass one, or leave"):
        check_job_args(JobConfig(**{field: value}))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_lora_dropout_outside_0_1_is_refused_in_one_line(p):
    with pytest.raises(UserError, match=rf"^--lora-dropout is a probability in \[0, 1\) \(0: none; recipes"
                                        rf" use 0.05-0.1\), got {p}$"):
        check_job_args(JobConfig(lora_dropout=p))
    check_job_args(JobConfig(lora_dropout=0.05))


def test_a_negative_weight_decay_is_refused_before_the_job_begins():
    # it was torch's ValueError traceback from the first round's optimizer, after an --overwrite
    # folder's results had been replaced
    with pytest.raises(UserError, match=r"^--weight-decay must be ≥ 0 \(0: none\), got -0.1$"):
        check_job_args(JobConfig(weight_decay=-0.1))


@pytest.mark.parametrize("seed", [-1, 2**32, 10**23])
def test_a_seed_the_generators_refuse_is_refused_in_one_line(seed):
    # -1 was numpy's ValueError traceback; 10**23 "cannot load model from ...: Overflow"
    with pytest.raises(UserError, match=f"^--seed must be in 0..4294967295, got {seed}$"):
        check_job_args(JobConfig(seed=seed))


@pytest.mark.parametrize("dp", ["none", "sample"])
@pytest.mark.parametrize("clip", [0.0, -1.0])
def test_a_clip_that_is_not_positive_is_refused_with_or_without_dp(dp, clip):
    # without --dp it was taken: each client's gradient was scaled by clip / norm, so 0 trained nothing
    # and -1 trained against the loss
    with pytest.raises(UserError, match=f"^--max-grad-norm must be > 0, got {clip}: pass a bound, or leave"):
        check_job_args(JobConfig(max_grad_norm=clip, dp=dp, epsilon=8.0))


def test_a_dp_setting_without_dp_is_said_with_that_the_run_is_not_private(capsys):
    # --epsilon 4 without --dp ran a non-private job without a word
    check_job_args(JobConfig(epsilon=4.0, alpha=0.1))
    assert capsys.readouterr().err.splitlines() == [
        "fedlora: --epsilon 4.0 is not used: it is read only with --dp sample or client, so this run is"
        " not differentially private",
        "fedlora: --alpha 0.1 is not used: it is read only with --partition dirichlet or dirichlet-clients"]
    check_job_args(JobConfig(epsilon=4.0, dp="sample", alpha=0.1, partition="dirichlet"))
    assert capsys.readouterr().err == ""


#: A value away from the default for each field of USED_ONLY_WITH, and the settings that read it.
UNUSED = {"epsilon": (4.0, {"dp": "client"}), "delta": (1e-3, {"dp": "sample"}),
          "noise_multiplier": (1.0, {"dp": "sample"}), "dp_reproducible": (True, {"dp": "client"}),
          "dp_backend": ("opacus", {"dp": "sample"}), "update_clip": (2.0, {"dp": "client"}),
          "alpha": (0.1, {"partition": "dirichlet-clients"}), "trim": (0.2, {"robust_mean": "krum"}),
          "secagg_range": (1.0, {"secagg": True}), "secagg_threshold": (0.8, {"secagg": True}),
          "no_error_feedback": (True, {"compress": "int8"}), "init_batches": (4, {"strategy": "fed-sb"}),
          "test_text_column": ("t", {"test_data": "x.csv"}),
          "test_label_column": ("y", {"test_data": "x.csv"}),
          "init_text_column": ("t", {"init_data": "p.csv"}),
          "init_label_column": ("y", {"init_data": "p.csv"})}


@pytest.mark.parametrize("name", sorted(USED_ONLY_WITH))
def test_each_field_read_only_beside_a_setting_is_said_without_it_and_not_with_it(name, capsys):
    value, setting = UNUSED[name]
    warn_unused(JobConfig(**{name: value}))
    err = capsys.readouterr().err
    assert err.startswith(f"fedlora: --{name.replace('_', '-')}") and "is not used" in err
    assert err.count("\n") == 1
    warn_unused(JobConfig(**{name: value}, **setting))
    assert capsys.readouterr().err == ""


def test_a_dp_runs_config_rerun_with_dp_none_still_runs(capsys):
    # the reason these are said, not refused: a finished DP run's config.json, rerun with --dp none,
    # carries its ε
    job = to_config(build_parser().parse_args(["--epsilon", "8", "--dp", "none"]))
    check_job_args(job)
    assert "--epsilon 8.0 is not used" in capsys.readouterr().err


def test_gradient_checkpointing_under_dp_sgd_is_refused():
    with pytest.raises(UserError, match="^--gradient-checkpointing recomputes activations, which DP-SGD's"):
        check_job_args(JobConfig(dp="sample", epsilon=8.0, gradient_checkpointing=True))
    check_job_args(JobConfig(dp="client", epsilon=8.0, delta=1e-3, gradient_checkpointing=True))
