"""The server's public start (``fedlora.privacy.public``): the adapters' warm start on ``--init-data``."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest
import torch

from fedlora.errors import UserError
from fedlora.job.flags import to_config
from fedlora.job.schema import JobConfig
from fedlora.kernels import Routing
from fedlora.privacy.dpsgd import example_norms
from fedlora.privacy.public import WARM_SEED, split_public
from fedlora.rounds.coordinator import Coordinator
from fedlora.simulations.cli import build_parser
from fedlora.simulations.engine import build_job
from fedlora.tasks import gather_rows
from fedlora.training.train import ClientSampler, TrainConfig, train_clients


def _started(tiny_bert_dir, tiny_csv, *extra, public=None):
    """A started Coordinator of a 2-client job whose public file is ``public`` (default ``tiny_csv``)."""
    args = ["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--num-clients", "2", "--rank", "4",
            "--max-length", "16", "--batch-size", "8", "--lr", "5e-2", "--head", "public",
            "--init-data", str(public or tiny_csv), *extra]
    cfg = to_config(build_parser().parse_args(args), device="cpu")
    job = build_job(cfg)
    coord = Coordinator(cfg, job.strategy, job.fm, job.test, job.public)
    coord.start()
    return job, coord


def _public_loss(job) -> float:
    """The mean loss of slot 0 on the public examples."""
    public = job.public
    batch = gather_rows(public, list(range(len(public["labels"]))), torch.device("cpu"))
    labels = batch.pop("labels")
    job.fm.eval()
    with torch.no_grad():
        out = job.fm(routing=Routing.from_ids(torch.zeros(len(labels), dtype=torch.long)), **batch)
    return float(job.task.row_losses(out.logits, labels).mean())


@pytest.mark.parametrize("strategy", ["fedavg", "ffa-lora"])
def test_warm_start_is_the_strategys_aggregate_of_those_public_steps(tiny_bert_dir, tiny_csv, strategy):
    # Execute: the same job without and with 6 public steps
    cold_job, cold = _started(tiny_bert_dir, tiny_csv, "--strategy", strategy)
    warm_job, warm = _started(tiny_bert_dir, tiny_csv, "--strategy", strategy, "--public-steps", "6")
    # the reference: those 6 ordinary steps of slot 0 by hand, from the cold start
    rows, _ = split_public(len(cold_job.public["labels"]), warm_job.cfg)
    tc = replace(TrainConfig.from_job(cold_job.cfg), local_steps=6, batch_size=8)
    train_clients(cold_job.fm, cold_job.public, [ClientSampler(rows, seed=WARM_SEED)], tc, rnd=0)
    # Assert: round 0's global factors are slot 0's after those steps (one upload aggregates to itself),
    # loaded into every client slot; the head is the public one, unchanged (frozen); FFA-LoRA's A
    # stays the seeded one, only B moves
    for name, layer in warm_job.fm.adapters.items():
        A_ref, B_ref = cold_job.fm.adapters[name].get_slot(0)
        A, B = warm.state.factors[name]
        torch.testing.assert_close(B, B_ref)
        torch.testing.assert_close(A, A_ref)
        assert B.abs().max() > 0 and cold.state.factors[name][1].abs().max() == 0
        for k in range(warm_job.fm.num_clients):
            torch.testing.assert_close(layer.get_slot(k)[1], B)
        if strategy == "ffa-lora":
            torch.testing.assert_close(A, cold.state.factors[name][0])
    for key, t in warm.state.head.items():
        torch.testing.assert_close(t, cold.state.head[key])
    assert warm.round == 0 and warm.state.round == 0


def test_warm_start_learns_and_the_clip_is_measured_after_it(tiny_bert_dir, tiny_csv, public_csv):
    # Execute: a --dp sample job measuring its clip on the public file, without and with a warm start
    dp = ["--dp", "sample", "--epsilon", "8", "--delta", "1e-3"]
    cold_job, cold = _started(tiny_bert_dir, tiny_csv, *dp, public=public_csv)
    warm_job, warm = _started(tiny_bert_dir, tiny_csv, *dp, "--public-steps", "12", public=public_csv)
    # Assert: the public examples' loss fell; the clip is the median norm at the warm state of the
    # examples held out of the warm start (not of all of them, nor at the cold state)
    public = warm_job.public
    assert _public_loss(warm_job) < _public_loss(cold_job)
    _, held = split_public(len(public["labels"]), warm_job.cfg)
    tc = TrainConfig.from_job(warm_job.cfg, clip=1.0)
    norms = example_norms(warm_job.fm, public, held, tc, torch.device("cpu"))
    assert warm.clip == pytest.approx(float(torch.quantile(norms.double(), 0.5)))
    every = example_norms(warm_job.fm, public, list(range(len(public["labels"]))), tc, torch.device("cpu"))
    assert warm.clip != pytest.approx(float(torch.quantile(every.double(), 0.5)))
    assert warm.clip != pytest.approx(cold.clip)


def test_the_clip_is_measured_on_public_rows_the_warm_start_did_not_train_on():
    # Execute
    cold = split_public(10, JobConfig(public_steps=0))
    warm = split_public(10, JobConfig(public_steps=5))
    warm_again = split_public(10, JobConfig(public_steps=5))
    other_seed = split_public(10, JobConfig(public_steps=5, seed=1))
    # Assert: without a warm start both use every row; with one, 2 of 10 rows (20%, seeded) are the
    # clip's alone, the other 8 the warm start's
    assert cold == (list(range(10)), list(range(10)))
    train, held = warm
    assert len(held) == 2 and sorted(train + held) == list(range(10)) and not set(train) & set(held)
    assert warm == warm_again and other_seed != warm
    assert all(split_public(2, JobConfig(public_steps=5)))  # a tiny file: one row each


def test_a_public_file_with_its_own_column_names_is_read_by_the_init_column_flags(
        tiny_bert_dir, tiny_csv, public_csv, tmp_path):
    # Prepare: the public file with other column names (a public set of another source)
    with open(public_csv, newline="") as f:
        rows = list(csv.reader(f))
    renamed = tmp_path / "public_renamed.csv"
    with open(renamed, "w", newline="") as f:
        csv.writer(f).writerows([["review", "sentiment"]] + rows[1:])
    assert rows[0] == ["text", "label"]
    # Execute and assert: without the flags, the refusal names --init-text-column (--text-column would
    # break --data); with them, the encoded public examples are the original file's
    with pytest.raises(UserError, match=r"^--init-data: text column 'text' is not in .*"
                                        r"pass --init-text-column review$"):
        _started(tiny_bert_dir, tiny_csv, public=renamed)
    job, _ = _started(tiny_bert_dir, tiny_csv, "--init-text-column", "review", "--init-label-column",
                      "sentiment", public=renamed)
    ref, _ = _started(tiny_bert_dir, tiny_csv, public=public_csv)
    assert job.public.keys() == ref.public.keys()
    for key in ref.public:
        assert torch.equal(job.public[key], ref.public[key])
