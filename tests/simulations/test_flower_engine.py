"""``fedlora-sim --engine flower`` (Flower's Ray simulation, one ClientApp call per client)
against the batched engine: same job and seed, same global adapter.

Only what Flower's engine itself must show: clients it rebuilds keep their state in
``context.state``, and a DPO job's rebuilt clients compute their reference on the unfolded base.
The same ServerApp and ClientApp with clients rebuilt for every message, strategy by strategy
(FLoRA and FlexLoRA with mixed ranks, Fed-SB, FFA-LoRA, FedSA-LoRA, sample-level DP and its public
start, SecAgg+, sft, DPO under FLoRA), are compared with the batched engine in one process in
``tests/server/test_grid_parity.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fedlora.simulations.cli import main
from tests.simulations import stall

pytestmark = pytest.mark.slow


def _job(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--num-clients", "3",
            "--rounds", "3", "--local-steps", "2", "--batch-size", "4", "--rank", "4",
            "--max-length", "16", "--quiet", *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


#: FedSA-LoRA's personal B and sample-level DP's ledger: state each client must keep although
#: Flower's engine rebuilds it for every message (only the node's ``context.state`` survives).
STATEFUL = ["--strategy", "fedsa-lora", "--personal-test-fraction", "0.3", "--dp", "sample", "--epsilon", "8",
            "--delta", "1e-3", "--dp-reproducible"]


def flower_leg(make_flags, tmp_path, limit: float = 240.0, attempts: int = 2):
    """Run ``fedlora-sim --engine flower`` in a process (session) of its own; the folder it wrote.

    A run not finished within ``limit`` seconds is reported (:mod:`tests.simulations.stall`: what
    each of its processes was doing), killed with its process group (the CLI and its SuperLink; the
    ServerApp's ``flwr-simulation`` process, in a session of its own, exits once the SuperLink is
    gone) and run again in a fresh folder, with the report as a warning. Such stalls on 2-core CI
    (sessions 18-23) were the ServerApp waiting out its round timeout for nodes whose first answer
    came after ``IDENTIFY_TIMEOUT`` (Ray actors still importing torch); they are fixed in
    ``FlowerTransport._identify``, and a stall of another kind would show here."""
    for attempt in range(attempts):
        out = tmp_path / f"flower-{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "fedlora.simulations.cli", *make_flags(out)],
                                start_new_session=True)
        try:
            assert proc.wait(limit) == 0
            return out
        except subprocess.TimeoutExpired:
            seen = stall.report(proc.pid, out, tmp_path / f"stall-{attempt}.txt").read_text()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            warnings.warn(f"Flower's engine did not finish within {limit:.0f} s (attempt {attempt + 1});"
                          f" killed and run again. What its processes were doing:\n{seen}", stacklevel=2)
    raise AssertionError(f"Flower's engine did not finish in {attempts} attempts of {limit:.0f} s")


def test_flower_engine_keeps_client_state_and_reaches_the_batched_adapter(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: the batched run of the job
    batched = tmp_path / "batched"
    assert main(_job(tiny_bert_dir, tiny_csv, batched, *STATEFUL)) == 0
    # Execute: the same job on Flower's simulation engine (3 virtual SuperNodes)
    flower = flower_leg(lambda out: _job(tiny_bert_dir, tiny_csv, out, "--engine", "flower", *STATEFUL),
                        tmp_path)
    # Assert: the same final adapter; the same uploads; stateless Flower clients get
    # at least what the batched engine's clients get each round (shared factors re-sent)
    a = load_file(batched / "adapter" / "adapter_model.safetensors")
    b = load_file(flower / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    rb, rf = _rows(batched), _rows(flower)
    assert [r["round"] for r in rf] == [0, 1, 2, 3]
    for x, y in zip(rb[1:], rf[1:], strict=True):
        assert y["clients"] == 3 and sorted(y["bytes_up_per_client"]) == sorted(x["bytes_up_per_client"])
        assert y["bytes_down"] >= x["bytes_down"]
        assert y["accuracy"] == pytest.approx(x["accuracy"], abs=1e-9)
        # each client's personal B survives Flower rebuilding it (context.state)
        assert y["personal_clients"] == 3
        assert y["personal_accuracy"] == pytest.approx(x["personal_accuracy"], abs=1e-9)
        # each client's ledger survives Flower rebuilding it (kept in the node's context.state)
        assert len(y["epsilon_per_client"]) == 3 and y["epsilon_per_client"] == x["epsilon_per_client"]
    assert rf[1]["epsilon"] < rf[3]["epsilon"] <= 8.0


def test_flower_engine_runs_dpo_to_the_batched_adapter(tiny_chat_llama_dir, sentiment_tsv, tmp_path):
    from tests.server.local_grid import assert_same_adapter
    from tests.server.test_grid_parity import sft_job

    # Prepare: DPO pairs from label words under FLoRA, whose folds change the base that Flower's
    # rebuilt clients must compute their reference on before any fold (RPO's NLL term on)
    flags = [*sft_job(tiny_chat_llama_dir, sentiment_tsv, 3, 2), "--task", "dpo", "--strategy", "flora",
             "--dpo-sft-weight", "0.5", "--quiet"]
    # Execute
    assert main([*flags, "--out", str(tmp_path / "batched")]) == 0
    assert main([*flags, "--engine", "flower", "--out", str(tmp_path / "flower")]) == 0
    # Assert: the same adapter and the same rewards every round
    assert_same_adapter(tmp_path / "batched", tmp_path / "flower", rtol=1e-4, atol=1e-5)
    rb, rf = _rows(tmp_path / "batched"), _rows(tmp_path / "flower")
    assert [r["round"] for r in rf] == [0, 1, 2] and rf[-1]["reward_margin"] != 0
    for x, y in zip(rb, rf, strict=True):
        assert y["reward_accuracy"] == x["reward_accuracy"]
        assert y["reward_margin"] == pytest.approx(x["reward_margin"], rel=1e-4, abs=1e-7)


def test_flower_engine_refuses_batched_only_flags(tiny_bert_dir, tiny_csv, tmp_path, capsys):
    # Execute
    code = main(_job(tiny_bert_dir, tiny_csv, tmp_path / "o", "--engine", "flower",
                     "--max-clients-per-pass", "2"))
    # Assert: one line naming the flags
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--engine batched only" in err[0]
