"""``--task regression`` (fedlora.tasks.regression): its metrics by hand, its loss, its evaluation,
its one-output head, its partitions, and the refusals of adapters and flags of classes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedlora.data.loading import load_file, partition
from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.tasks import get_task
from fedlora.tasks.regression import average_ranks, pearson, spearman

PAIR = {"text_column": "sentence1+sentence2", "label_column": "score"}


def test_average_ranks_share_the_mean_rank_of_ties():
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert average_ranks(torch.tensor([1.0, 1.0, 1.0])).tolist() == [2.0, 2.0, 2.0]


def test_pearson_and_spearman_by_hand():
    # x - x̄ = [-1.5, -.5, .5, 1.5], y - ȳ = [-3, -1, 0, 4]: Σ products 11, Σ squares 5 and 26
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 4.0, 5.0, 9.0])
    assert pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    assert spearman(x, y) == pytest.approx(1.0)  # monotone
    # ties: ranks [2, 3.5, 3.5, 1] against [1, 2, 3, 4]: centred [-.5, 1, 1, -1.5] · [-1.5, -.5, .5, 1.5]
    # = -1.5, over √(4.5 · 5)
    assert spearman(torch.tensor([10.0, 20.0, 20.0, 5.0]), x) == pytest.approx(-1.5 / math.sqrt(22.5))
    # one prediction for every example: no linear relation to read
    assert pearson(torch.ones(4), y) == 0.0 and spearman(torch.ones(4), y) == 0.0


def test_correlations_equal_scipys_on_scores_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (50,), generator=g).double()            # many ties, as 0-5 scores have
    y = x + torch.randn(50, generator=g, dtype=torch.float64)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x.numpy(), y.numpy())[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)


def test_the_loss_is_each_examples_squared_error():
    task = get_task("regression")
    logits, labels = torch.tensor([[1.0], [3.0], [0.5]]), torch.tensor([2.0, 1.0, 0.5])
    assert task.loss_sums(logits, labels).tolist() == [1.0, 4.0, 0.0]
    assert task.row_losses(logits, labels).tolist() == [1.0, 4.0, 0.0]
    two = task.client_losses(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 1.0]), 2)
    assert two.tolist() == [1.0, 4.0]


class _FirstToken(nn.Module):
    """A stand-in model whose one output is each row's first token id."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, routing=None, input_ids=None, **_):
        return type("Out", (), {"logits": input_ids[:, :1].float()})


def test_evaluate_scores_the_predictions_by_hand():
    # Prepare: predictions [3, 1, 2, 5] of targets [2, 1, 2, 4], in two batches (3 + 1 rows)
    data = {"input_ids": torch.tensor([[3], [1], [2], [5]]), "labels": torch.tensor([2.0, 1.0, 2.0, 4.0]),
            "attention_mask": torch.ones(4, 1, dtype=torch.long)}
    # Execute
    got = get_task("regression").evaluate(_FirstToken(), data, JobConfig(eval_batch_size=3))
    # Assert: errors [1, 0, 0, 1]; centred [.25, -1.75, -.75, 2.25] · [-.25, -1.25, -.25, 1.75] = 6.25 over
    # √(8.75 · 4.75); ranks [3, 1, 2, 4] against [2.5, 1, 2.5, 4]: 4.5 over √(5 · 4.5)
    assert got["mse"] == got["loss"] == 0.5 and got["eval_examples"] == 4
    assert got["pearson"] == got["accuracy"] == pytest.approx(6.25 / math.sqrt(8.75 * 4.75))
    assert got["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert get_task("regression").headline(data) == "pearson"


def test_a_one_output_regression_head_on_float_targets(tiny_bert_dir, stsb_tsv):
    from fedlora.job.setup import build_model, splits
    from fedlora.strategies.plan import LORA

    # Prepare / Execute: the job's examples and its model (the saved 3-label head is replaced)
    cfg = JobConfig(task="regression", model=str(tiny_bert_dir), data=str(stsb_tsv), max_length=16, **PAIR)
    train, test, names = splits(cfg)
    fm, tokenizer, _ = build_model(cfg, [4, 4], LORA, len(names), names)
    data = get_task("regression").encode(tokenizer, train, cfg)
    # Assert: no classes, float targets, one output per client slot, transformers' regression config
    assert names == [] and test.targets is not None and len(train) + len(test) == 120
    assert data["labels"].dtype == torch.float32 and data["labels"].tolist() == pytest.approx(train.targets)
    assert fm.model.config.num_labels == 1 and fm.model.config.problem_type == "regression"
    assert tuple(fm.heads["classifier"].weight.shape) == (2, 1, 32)


def test_a_regression_partitions_iid_or_by_a_column_and_refuses_a_split_by_labels(tmp_path):
    # Prepare: scores with a genre column
    path = tmp_path / "s.csv"
    path.write_text("text,score,genre\n" + "".join(f"t{i},{i / 4},{'ab'[i % 2]}\n" for i in range(8)))
    ds = load_file(path, "text", "score", scores=True)
    # Execute / Assert: IID covers every example once
    assert sorted(i for part in partition(ds, 2, "iid", 1.0, 0) for i in part) == list(range(8))
    # a Dirichlet split by labels has no classes to split: one line naming iid and --partition-column
    with pytest.raises(UserError, match=r"^--partition dirichlet splits by the labels, and this data has none"
                                        r" \(its targets are scores, not classes\): use --partition iid, or"
                                        r" --partition-column NAME"):
        partition(ds, 2, "dirichlet", 1.0, 0)
    # by the column instead: each client one genre, the scores kept
    from fedlora.data.groups import with_groups

    grouped = with_groups(ds, str(path), "genre")
    parts = partition(grouped, 2, "natural", 1.0, 0)
    assert [grouped.subset(p).targets for p in parts] == [[0.0, 0.5, 1.0, 1.5], [0.25, 0.75, 1.25, 1.75]]


def test_plan_gives_the_head_one_output_and_refuses_num_labels(tiny_bert_dir, stsb_tsv, capsys):
    from fedlora.plan.cli import main
    from fedlora.plan.shape import build_shape

    shape = build_shape(JobConfig(task="regression", model=str(tiny_bert_dir)), 5)
    assert shape.config.num_labels == 1 and tuple(shape.fm.heads["classifier"].weight.shape) == (1, 1, 32)
    flags = ["--task", "regression", "--model", str(tiny_bert_dir), "--data", str(stsb_tsv),
             "--text-column", "sentence1+sentence2", "--label-column", "score", "--max-length", "16"]
    assert main(flags) == 0
    capsys.readouterr()
    assert main([*flags, "--num-labels", "3"]) == 2
    said = capsys.readouterr().err
    assert said.count("\n") == 1
    assert "--num-labels counts a classifier's classes, and --task regression's" in said


def test_bbcnews_is_refused_for_a_regression_in_one_line():
    from fedlora.job.checks import check_task_args

    with pytest.raises(UserError, match=r"^--data bbcnews is not for --task regression; it reads a data"):
        check_task_args(JobConfig(task="regression"))
