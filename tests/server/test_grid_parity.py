"""Deployment == simulator, strategy by strategy, without processes.

The real ServerApp (``run_server``) and ClientApp run in this process over :class:`LocalGrid`
(``tests/server/local_grid.py``) with the run config ``fedlora-server`` submits (clients keep their
model and factors between rounds, as a ``fedlora-client`` does), or the one ``fedlora-sim --engine
flower`` submits (clients rebuilt for every message: only ``context.state`` survives, as on Flower's
simulation engine). Either must reach what ``fedlora-sim``'s batched engine reaches on the same job:
the same bytes per client, accuracies and adapter. What only real processes show (a folding strategy
over gRPC, kills, resume, TLS, oversize replies) is in ``test_deployment.py`` / ``test_oversize.py``;
what only Ray shows is in ``tests/simulations/test_flower_engine.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.server.app import run_server
from fedlora.simulations.cli import build_parser, to_config
from fedlora.simulations.cli import main as sim
from tests.server.local_grid import (
    LocalGrid,
    adapter_tensors,
    assert_same_adapter,
    deployment_run_config,
    flower_run_config,
    rows,
)

pytestmark = pytest.mark.slow


def job(tiny_bert_dir, tiny_csv, clients: int = 2) -> list[str]:
    """Job flags shared by fedlora-sim and fedlora-server (as ``test_deployment.py``'s)."""
    return ["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--num-clients", str(clients),
            "--local-steps", "2", "--batch-size", "4", "--max-length", "16", "--rank", "4"]


def simulate(flags: list[str], out) -> list[dict]:
    assert sim([*flags, "--quiet", "--out", str(out)]) == 0
    return rows(out)


def deploy(flags: list[str], out, clients: int, stateless: bool = False) -> list[dict]:
    """``flags``' job through the real ServerApp and ClientApps over an in-memory grid."""
    cfg = to_config(build_parser().parse_args(flags))
    rc = flower_run_config(cfg, out) if stateless else deployment_run_config(cfg, out)
    run_server(LocalGrid(rc, clients, stateless=stateless), rc)
    return rows(out)


#: Extra flags per strategy: FLoRA and FlexLoRA's clients train different ranks; FedSA-LoRA and
#: FlexLoRA's clients keep B, so their models are measured on their own held-out examples.
EXTRA = {"fedavg": [], "flora": ["--ranks", "2,4"], "lora-fair": [], "fed-sb": [], "ffa-lora": [],
         "rolora": [], "fedex-lora": [], "flexlora": ["--ranks", "2,4", "--personal-test-fraction", "0.3"],
         "fedsa-lora": ["--personal-test-fraction", "0.3"]}


@pytest.mark.parametrize("strategy", list(EXTRA))
def test_deployment_matches_the_simulator(tiny_bert_dir, tiny_csv, tmp_path, strategy):
    # Prepare: the same 2-round job for fedlora-sim and the deployed apps (2 clients = partitions 0, 1)
    flags = ["--strategy", strategy, "--rounds", "2", *job(tiny_bert_dir, tiny_csv), *EXTRA[strategy]]
    # Execute
    want = simulate(flags, tmp_path / "sim")
    got = deploy(flags, tmp_path / "grid", 2)
    # Assert: the deployed run finished rounds 0..2 with both clients, bytes both ways, a PEFT export
    assert [r["round"] for r in got] == [0, 1, 2]
    for r in got[1:]:
        assert r["clients"] == 2 and r["rejected"] == [] and r["failed"] == 0
        assert len(r["bytes_up_per_client"]) == 2 and min(r["bytes_up_per_client"]) > 0
        assert r["bytes_down"] > 0 and 0 <= r["accuracy"] <= 1
    if strategy == "fed-sb":
        assert got[0]["clients"] == 2 and got[0]["bytes_up"] > 0      # the two sketches
    if strategy in ("fedsa-lora", "flexlora"):  # both clients measured their own models each round
        assert all(r["personal_clients"] == 2 and r["personal_examples"] > 0 for r in got[1:])
    grid = tmp_path / "grid"
    config = json.loads((grid / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert json.loads((grid / "status.json").read_text())["state"] == "finished"
    # ... and identical bytes up and down per client (round 0: Fed-SB's sketches and probes), the
    # same personal accuracy (FedSA-LoRA: the deployed clients kept their own B) and adapter
    for s, d in zip(want, got, strict=True):
        assert s["bytes_up_per_client"] == d["bytes_up_per_client"]
        assert s["bytes_down_per_client"] == d["bytes_down_per_client"]
        assert s.get("personal_accuracy") == pytest.approx(d.get("personal_accuracy"), abs=1e-9)
        assert s.get("truncation_error_per_client") == pytest.approx(d.get("truncation_error_per_client"))
    a, b = adapter_tensors(tmp_path / "sim"), adapter_tensors(grid)
    assert a.keys() == b.keys() and any(k.endswith("lora_A.weight") for k in a)
    # FlexLoRA: the SVD's exported stack carries float32 training differences (batched vs one
    # client per process) up to ~1e-6 absolute on its smallest entries; Fed-SB: the singular
    # vectors of its sketched initialisation move by (float32 difference) / (singular gap),
    # ~1e-5 on A's entries of ~0.2 for this tiny random model
    atol = {"flexlora": 1e-5, "fed-sb": 5e-5}.get(strategy, 1e-6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4 if strategy == "fed-sb" else 1e-5, atol=atol)


def test_a_gpt2_deployment_matches_the_simulator(tiny_gpt2_dir, tiny_csv, tmp_path):
    # Prepare: FLoRA on GPT-2 (Conv1D layers, a bias-less score head) in fedlora-sim and deployed
    flags = ["--strategy", "flora", "--rounds", "2", *job(tiny_gpt2_dir, tiny_csv)]
    # Execute
    want = simulate(flags, tmp_path / "sim")
    got = deploy(flags, tmp_path / "grid", 2)
    # Assert: the same bytes every round and the same exported adapter, marked fan_in_fan_out
    assert [r["bytes_up_per_client"] for r in got] == [r["bytes_up_per_client"] for r in want]
    config = json.loads((tmp_path / "grid" / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["modules_to_save"] == ["score"]
    assert_same_adapter(tmp_path / "sim", tmp_path / "grid", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["fedavg", "ffa-lora"])
def test_secagg_deployment_matches_the_plain_simulator(tiny_bert_dir, tiny_csv, tmp_path, strategy):
    # Prepare: the plain job in fedlora-sim, and the same job deployed under SecAgg+
    flags = ["--strategy", strategy, "--rounds", "2", "--max-examples", "100", *job(tiny_bert_dir, tiny_csv)]
    # Execute
    simulate(flags, tmp_path / "sim")
    got = deploy([*flags, "--secagg"], tmp_path / "grid", 2)
    # Assert: both rounds through SecAgg+ (both clients, the quantization bound reported), and the
    # simulator's adapter within what quantization moves it (≤ 1e-8 a round, carried by training)
    assert [r["clients"] for r in got[1:]] == [2, 2] and all(r["secagg_error_bound"] < 1e-7 for r in got[1:])
    assert_same_adapter(tmp_path / "sim", tmp_path / "grid", rtol=0, atol=5e-6)


@pytest.mark.parametrize("strategy", ["fedavg", "fedex-lora", "flora"])
def test_server_lr_deployment_matches_the_simulator(tiny_bert_dir, tiny_csv, tmp_path, strategy):
    # Prepare: a server that moves 3 times the clients' mean update (in factors, or by a wider fold);
    # the deployed server reads --server-lr from the run config fedlora-server submits
    flags = ["--rounds", "2", "--server-lr", "3", "--strategy", strategy, *job(tiny_bert_dir, tiny_csv)]
    # Execute
    want = simulate(flags, tmp_path / "sim")
    got = deploy(flags, tmp_path / "grid", 2)
    # Assert: both report the step, and reach the same adapter (not the plain job's)
    assert [r.get("server_lr") for r in got] == [r.get("server_lr") for r in want] == [None, 3.0, 3.0]
    assert_same_adapter(tmp_path / "sim", tmp_path / "grid", rtol=1e-5, atol=1e-6)
    simulate(flags[:2] + flags[4:], tmp_path / "plain")
    with pytest.raises(AssertionError):
        assert_same_adapter(tmp_path / "plain", tmp_path / "grid", rtol=1e-3, atol=1e-4)


def test_per_round_adapters_of_a_deployment_equal_the_simulators(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: --save-every 1 over 2 rounds (FLoRA: round 2's export holds round 1's fold too)
    from safetensors.torch import load_file

    flags = ["--rounds", "2", "--save-every", "1", "--strategy", "flora", *job(tiny_bert_dir, tiny_csv)]
    # Execute
    simulate(flags, tmp_path / "sim")
    deploy(flags, tmp_path / "grid", 2)
    # Assert: each round's adapter, the same from both; the last round's is the final adapter
    def saved(out, rnd):
        return load_file(str(out / "adapters" / f"round-{rnd}" / "adapter_model.safetensors"))

    for rnd in (1, 2):
        want, got = saved(tmp_path / "sim", rnd), saved(tmp_path / "grid", rnd)
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    final = adapter_tensors(tmp_path / "sim")
    assert all(torch.equal(saved(tmp_path / "sim", 2)[k], final[k]) for k in final)
    assert sorted(p.name for p in (tmp_path / "sim" / "adapters").iterdir()) == ["round-1", "round-2"]
    assert any(v.shape != final[k].shape or not torch.equal(v, final[k])
               for k, v in saved(tmp_path / "sim", 1).items())


def test_a_deployment_from_an_init_adapter_matches_the_simulator(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: a 1-round run's adapter (with its head), the start of a 2-round FedEx-LoRA job
    first = ["--rounds", "1", *job(tiny_bert_dir, tiny_csv)]
    simulate(first, tmp_path / "first")
    flags = ["--rounds", "2", "--strategy", "fedex-lora", "--init-adapter",
             str(tmp_path / "first" / "adapter"), *job(tiny_bert_dir, tiny_csv)]
    # Execute: the server and every client fold it into their base
    want = simulate(flags, tmp_path / "sim")
    got = deploy(flags, tmp_path / "grid", 2)
    # Assert: round 0 is the first run's model, and both engines reach the same adapter
    assert got[0]["accuracy"] == want[0]["accuracy"] == rows(tmp_path / "first")[-1]["accuracy"]
    assert got[0]["loss"] == pytest.approx(rows(tmp_path / "first")[-1]["loss"], abs=1e-6)
    assert_same_adapter(tmp_path / "sim", tmp_path / "grid", rtol=1e-5, atol=1e-6)


def test_fold_rank_over_nf4_deployment_matches_the_simulator(tiny_llama_dir, tmp_path):
    # Prepare: FLoRA over a 4-bit base, residuals truncated to 3 directions (each round folds 8):
    # from round 2 on every deployed client trains over the residual it truncated itself
    pytest.importorskip("bitsandbytes")
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat sat on mat number {i}"}) + "\n" for i in range(40)))
    flags = ["--task", "causal-lm", "--model", str(tiny_llama_dir), "--data", str(data), "--num-clients", "2",
             "--local-steps", "2", "--batch-size", "4", "--max-length", "16", "--rank", "4", "--rounds", "3",
             "--strategy", "flora", "--quantize", "nf4", "--fold-rank", "3", "--lr", "2e-2"]
    # Execute
    want = simulate(flags, tmp_path / "sim")
    got = deploy(flags, tmp_path / "grid", 2)
    # Assert: the same truncation cost every round, and the same (rank-3) exported residual
    errors = [r["fold_truncation_error"] for r in got]
    assert errors[0] == 0 and min(errors[1:]) > 0
    assert errors == pytest.approx([r["fold_truncation_error"] for r in want], rel=1e-4)
    assert_same_adapter(tmp_path / "sim", tmp_path / "grid", rtol=1e-4, atol=1e-6)
    # ... and the same bytes: round 1 sends nothing (fresh adapters, no head), where the deployment
    # had sent an empty record's 908 bytes
    assert [r["bytes_down_per_client"] for r in got] == [r["bytes_down_per_client"] for r in want]
    assert got[1]["bytes_down_per_client"] == [0, 0]
    config = json.loads((tmp_path / "grid" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 3


def test_client_level_dp_deployment_reports_growing_epsilon_within_budget(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: client-level DP (the server clips and noises the mean) for 2 rounds, budget ε = 8
    flags = ["--rounds", "2", "--dp", "client", "--epsilon", "8", "--delta", "1e-3",
             *job(tiny_bert_dir, tiny_csv)]
    # Execute
    got = deploy(flags, tmp_path / "grid", 2)[1:]
    # Assert: every round reports the ε spent, growing, within the budget
    assert [(r["dp"], r["clients"]) for r in got] == [("client", 2), ("client", 2)]
    assert 0 < got[0]["epsilon"] < got[1]["epsilon"] <= 8.0 * 1.001


SFT = ["--task", "sft", "--text-column", "sentence", "--label-words", "0=negative,1=positive",
       "--prompt-template", "Review: {text}", "--max-length", "24"]


def sft_job(model, data, clients: int, rounds: int) -> list[str]:
    return [*SFT, "--model", str(model), "--data", str(data), "--num-clients", str(clients), "--local-steps",
            "2", "--batch-size", "4", "--rank", "4", "--rounds", str(rounds)]


def test_sft_deployment_matches_the_simulator(tiny_chat_llama_dir, sentiment_tsv, tmp_path):
    # Prepare: an instruction-tuning job; the clients learn it from the server's run config
    flags = sft_job(tiny_chat_llama_dir, sentiment_tsv, 2, 2)
    # Execute
    want = simulate(flags, tmp_path / "sim")
    got = deploy(flags, tmp_path / "grid", 2)
    # Assert: the same answer accuracy each round and the same CAUSAL_LM adapter
    for s, d in zip(want, got, strict=True):
        assert d["metric"] == "answer_accuracy" and d["answer_accuracy"] == s["answer_accuracy"]
    assert_same_adapter(tmp_path / "sim", tmp_path / "grid", rtol=1e-5, atol=1e-6)
    config = json.loads((tmp_path / "grid" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"


def test_dpo_deployment_matches_the_simulator(tiny_chat_llama_dir, sentiment_tsv, tmp_path):
    # Prepare: preference pairs from label words under FLoRA (whose folds change the base after the
    # reference was cached) and DP-SGD per pair (a lone client's auto backend: fedlora's kernels)
    flags = [*sft_job(tiny_chat_llama_dir, sentiment_tsv, 2, 2), "--task", "dpo", "--strategy", "flora", *DP]
    # Execute
    want = simulate(flags, tmp_path / "sim")
    got = deploy(flags, tmp_path / "grid", 2)
    # Assert: the same rewards and answers each round, and the same adapter
    for s, d in zip(want, got, strict=True):
        assert d["metric"] == "answer_accuracy" and d["answer_accuracy"] == s["answer_accuracy"]
        assert d["reward_accuracy"] == s["reward_accuracy"]
        assert d["reward_margin"] == pytest.approx(s["reward_margin"], rel=1e-4, abs=1e-7)
    assert_same_adapter(tmp_path / "sim", tmp_path / "grid", rtol=1e-5, atol=1e-6)


# --- stateless clients (Flower's simulation engine's run config, clients rebuilt every message) ---

DP = ["--dp", "sample", "--epsilon", "8", "--delta", "1e-3", "--dp-reproducible"]
PUBLIC = ["--head", "public", "--init-data", "PUBLIC_CSV", "--public-steps", "3"]
#: (Flower's own engine runs FedSA-LoRA under sample-level DP: tests/simulations/test_flower_engine.py)
STATELESS = {"flora-hetero": ["--strategy", "flora", "--ranks", "2,4,3"], "fed-sb": ["--strategy", "fed-sb"],
             "dp-sample-public-start": [*DP, *PUBLIC], "ffa-lora": ["--strategy", "ffa-lora"],
             "fedsa-lora": ["--strategy", "fedsa-lora", "--personal-test-fraction", "0.3"],
             "flexlora": ["--strategy", "flexlora", "--ranks", "2,4,3"],
             "cosine-lr": ["--lr-schedule", "cosine", "--lr-min", "1e-4"]}


@pytest.mark.parametrize("case", list(STATELESS))
def test_stateless_clients_reach_the_batched_adapter(tiny_bert_dir, tiny_csv, public_csv, tmp_path, case):
    # Prepare: a 3-client, 3-round job (dp-sample-public-start: the server trains the head, then
    # warm-starts the adapters on the public file, measures the clip there and sends it with each
    # round's config)
    extra = [str(public_csv) if a == "PUBLIC_CSV" else a for a in STATELESS[case]]
    flags = [*job(tiny_bert_dir, tiny_csv, clients=3), "--rounds", "3", *extra]
    # Execute: the batched engine, and the apps with every client rebuilt for every message
    rb = simulate(flags, tmp_path / "batched")
    rf = deploy(flags, tmp_path / "stateless", 3, stateless=True)
    # Assert: the same final adapter; the same uploads; stateless clients get at least what the
    # batched engine's clients get each round (folds / shared factors re-sent)
    assert_same_adapter(tmp_path / "batched", tmp_path / "stateless", rtol=1e-4, atol=1e-5)
    assert [r["round"] for r in rf] == [0, 1, 2, 3]
    for x, y in zip(rb[1:], rf[1:], strict=True):
        assert y["clients"] == 3 and sorted(y["bytes_up_per_client"]) == sorted(x["bytes_up_per_client"])
        assert y["bytes_down"] >= x["bytes_down"]
        assert y["accuracy"] == pytest.approx(x["accuracy"], abs=1e-9)
        # FedSA-LoRA: each client's personal B survives its rebuilding (context.state)
        assert y.get("personal_accuracy") == pytest.approx(x.get("personal_accuracy"), abs=1e-9)
        # DP: each client's ledger survives its rebuilding (kept in the node's context.state)
        assert y.get("epsilon_per_client") == x.get("epsilon_per_client")


def test_stateless_clients_under_secagg_reach_the_plain_batched_adapter(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: the plain batched run, and the job under SecAgg+ with stateless clients
    flags = [*job(tiny_bert_dir, tiny_csv, clients=3), "--rounds", "3", "--strategy", "ffa-lora",
             "--max-examples", "100"]
    # Execute
    simulate(flags, tmp_path / "batched")
    got = deploy([*flags, "--secagg"], tmp_path / "stateless", 3, stateless=True)
    # Assert: every round aggregated securely (3 clients, quantization bound reported), and the
    # same adapter up to what quantization moves it
    assert [(r["clients"], r["secagg_error_bound"] < 1e-7) for r in got[1:]] == [(3, True)] * 3
    assert_same_adapter(tmp_path / "batched", tmp_path / "stateless", rtol=0, atol=5e-6)


#: dpo: a rebuilt client recomputes its pairs' reference with every adapter off, on a base that
#: FLoRA's catch-up folds then change (the reference must be the base's, before any fold)
LLM_STATELESS = {"sft": [], "dpo-flora": ["--task", "dpo", "--strategy", "flora", "--dpo-sft-weight", "0.5"]}


@pytest.mark.parametrize("case", list(LLM_STATELESS))
def test_stateless_clients_run_llm_tasks_to_the_batched_adapter(tiny_chat_llama_dir, sentiment_tsv, tmp_path,
                                                                case):
    # Execute: the job on the batched engine, then with clients rebuilt for every message
    flags = [*sft_job(tiny_chat_llama_dir, sentiment_tsv, 3, 2), *LLM_STATELESS[case]]
    rb = simulate(flags, tmp_path / "batched")
    rf = deploy(flags, tmp_path / "stateless", 3, stateless=True)
    # Assert: the same CAUSAL_LM adapter and the same generated-answer accuracy, and perplexity
    # (sft) or rewards (dpo)
    assert_same_adapter(tmp_path / "batched", tmp_path / "stateless", rtol=1e-4, atol=1e-5)
    for x, y in zip(rb, rf, strict=True):
        assert y["answer_accuracy"] == x["answer_accuracy"]
        key = "reward_margin" if case.startswith("dpo") else "perplexity"
        assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-7)
    if case == "dpo-flora":
        assert rf[-1]["reward_margin"] != 0 and rf[-1]["strategy"] == "flora"
    config = json.loads((tmp_path / "stateless" / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"


REGRESSION = ["--task", "regression", "--text-column", "sentence1+sentence2", "--label-column", "score"]


def test_a_regression_under_dp_sgd_deployed_or_stateless_matches_the_simulator(tiny_bert_dir, stsb_tsv,
                                                                               tmp_path):
    # Prepare: STS-B-like scores, DP-SGD with the one-output head trained (its per-example gradients
    # clipped with the adapters'): fedlora's batched kernels in the simulator, Opacus on each
    # deployed client (a lone client's default backend), clients rebuilt every message in the other
    flags = [*REGRESSION, "--rounds", "2", *job(tiny_bert_dir, stsb_tsv), *DP, "--head", "train"]
    # Execute
    want = simulate(flags, tmp_path / "sim")
    got = deploy(flags, tmp_path / "grid", 2)
    stateless = deploy(flags, tmp_path / "stateless", 2, stateless=True)
    # Assert: the same correlations every round, and the same adapter and head
    assert [r["dp_backend"] for r in got[1:]] == ["opacus", "opacus"]
    for s, d, f in zip(want, got, stateless, strict=True):
        assert d["metric"] == f["metric"] == "pearson"
        assert d["pearson"] == pytest.approx(s["pearson"], abs=1e-6) == f["pearson"]
        assert d["spearman"] == pytest.approx(s["spearman"], abs=1e-6)
    for out in ("grid", "stateless"):
        assert_same_adapter(tmp_path / "sim", tmp_path / out, rtol=1e-4, atol=1e-6)
    assert adapter_tensors(tmp_path / "grid")["base_model.model.classifier.weight"].shape == (1, 32)


@pytest.mark.parametrize("dp", [False, True])
def test_lora_dropout_deployed_or_stateless_matches_the_simulator(tiny_bert_dir, tiny_csv, tmp_path, dp):
    # Prepare: --lora-dropout 0.1, plain or under DP-SGD (fedlora's kernels in the simulator, Opacus on
    # each deployed client): every engine draws each row's mask from its client's seed, round, step
    # and example, so all three reach one adapter
    plain = ["--rounds", "2", *job(tiny_bert_dir, tiny_csv), *(DP if dp else [])]
    flags = [*plain, "--lora-dropout", "0.1"]
    # Execute
    simulate(flags, tmp_path / "sim")
    deploy(flags, tmp_path / "grid", 2)
    deploy(flags, tmp_path / "stateless", 2, stateless=True)
    simulate(plain, tmp_path / "plain")
    # Assert: the same adapter, recorded with PEFT's lora_dropout, and not the adapter without dropout
    for out in ("grid", "stateless"):
        assert_same_adapter(tmp_path / "sim", tmp_path / out, rtol=1e-4 if dp else 1e-5, atol=1e-6)
        config = json.loads((tmp_path / out / "adapter" / "adapter_config.json").read_text())
        assert config["lora_dropout"] == 0.1
    with pytest.raises(AssertionError):
        assert_same_adapter(tmp_path / "plain", tmp_path / "grid", rtol=1e-3, atol=1e-4)
