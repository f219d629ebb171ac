"""fedlora-eval's Markdown table (``fedlora.job.evaluate.eval_table``), without running a model."""

from __future__ import annotations

from fedlora.job.evaluate import eval_table


def test_a_classification_rows_macro_f1_is_a_percentage_like_its_accuracies():
    # Prepare: an MNLI row; its macro_f1 0.1847 was shown "0.2", as if a count, beside "33.3%"
    row = {"model": "runs/mnli/adapter", "adapter": "runs/mnli/adapter", "metric": "accuracy",
           "accuracy": 0.3833, "loss": 1.0895, "macro_f1": 0.18474, "balanced_accuracy": 1 / 3,
           "mcc": 0.0512, "eval_examples": 60, "seconds": 0.4}
    # Execute
    lines = eval_table([row]).splitlines()
    # Assert
    assert lines[0] == ("| model | accuracy | loss | macro_f1 | balanced_accuracy | mcc | eval_examples"
                        " | seconds |")
    assert lines[2] == "| runs/mnli/adapter | 38.3% | 1.0895 | 18.5% | 33.3% | 0.0512 | 60 | 0.4 |"
