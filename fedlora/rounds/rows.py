"""A round's metric row: built from the coordinator's evaluation, its personal-evaluation columns,
and its line on the console."""

from __future__ import annotations

import math
import time

from fedlora.models.state import exact_global
from fedlora.rounds.coordinator import Coordinator
from fedlora.strategies.factors import residual_error


def round_row(coord: Coordinator, bytes_up: list[int], bytes_down: list[int], agg_error: float | None,
              losses: list[float] | None, train_seconds: float, clients: int, score: bool = True) -> dict:
    """The metric row of ``coord``'s last completed round: its model ``fm``, evaluated with the
    task's metrics on the held-out set, the bytes each way, the aggregate's and the strategy's
    own columns (the loop adds the transport's, the DP and personal columns).

    ``train_seconds``: the round's time so far (training, transfers, aggregation; setup for
    round 0); ``eval_seconds`` is timed here, and ``seconds`` is their sum, the round's wall time.
    ``score``: False for a round ``--eval-every`` skips; its ``accuracy`` and ``loss`` are None
    and the task's own metrics are left out.
    """
    t0 = time.perf_counter()
    metrics = {"accuracy": None, "loss": None}
    if score:
        with exact_global(coord.fm, coord.state):
            metrics = coord.task.evaluate(coord.fm, coord.test, coord.cfg)
    eval_seconds = time.perf_counter() - t0
    row = {
        "round": coord.round,
        "strategy": coord.strategy.name,
        "accuracy": metrics.pop("accuracy"),
        "loss": metrics.pop("loss"),
        "metric": coord.task.headline(coord.test),
        **metrics,
        "train_loss": sum(losses) / len(losses) if losses else None,
        "bytes_up": sum(bytes_up),
        "bytes_down": sum(bytes_down),
        "bytes_up_per_client": list(bytes_up),
        "bytes_down_per_client": list(bytes_down),
        "agg_error": None if agg_error is None or agg_error != agg_error else agg_error,
        "clients": clients,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "seconds": round(train_seconds + eval_seconds, 3),
        **(coord.metrics if coord.round else {}),
    }
    if coord.cfg.fold_rank:  # what truncating the residual beside a quantized base costs, so far
        row["fold_truncation_error"] = residual_error(coord.state)
    if coord.codec.on or coord.down.lossy:  # --compress / --compress-down (the transport adds compress_error)
        row.update(compress=str(coord.codec.scheme), compress_down=str(coord.down))
    if coord.cfg.dp == "sample":  # the per-example clip: given, or measured on --init-data
        row["max_grad_norm"] = coord.cfg.max_grad_norm or coord.clip
    row.update(coord.strategy.round_report())  # --dp client's ledger, the defences' counts
    return row



def personal_columns(results: list[dict]) -> dict:
    """``personal_accuracy``: the clients' own-model metric (each client's ``accuracy`` on its
    held-out examples), averaged with weights ``eval_examples``; ``personal_examples`` their sum."""
    n = sum(int(r["eval_examples"]) for r in results)
    if not n:
        return {}
    acc = sum(float(r["accuracy"]) * int(r["eval_examples"]) for r in results) / n
    return {"personal_accuracy": acc, "personal_examples": n, "personal_clients": len(results)}


METRIC_LABELS = {"accuracy": "acc", "answer_accuracy": "answer acc", "token_accuracy": "token acc",
                 "answer_contains": "answer contains", "answer_number": "answer number", "rouge_l": "rouge-l",
                 "mc_accuracy": "mc acc", "reward_accuracy": "reward acc"}


def format_row(row: dict) -> str:
    """One round as a line: the task's headline metric, loss (and perplexity), bytes, times.

    Parameters
    ----------
    row : dict
        A round's metric row, as the run made it or as ``metrics.jsonl`` gives it back (what
        ``fedlora-server`` and ``--engine flower`` print): there a loss that was not a finite number
        (a diverged run) is ``None`` (strict JSON), shown as ``nan`` as the simulator shows its own.

    Returns
    -------
    str
        The round's line.
    """
    err = "-" if row["agg_error"] is None else f"{row['agg_error']:.2e}"
    eps = "" if row.get("epsilon") is None else f"  ε {row['epsilon']:.2f}"
    ppl = f"  ppl {row['perplexity']:.2f}" if row.get("perplexity") is not None else ""
    ppl += f"  personal {row['personal_accuracy']:.4f}" if row.get("personal_accuracy") is not None else ""
    if row.get("reward_margin") is not None:  # --task dpo (its reward accuracy, unless the headline)
        shown = row.get("metric") == "reward_accuracy"
        ppl += "" if shown else f"  reward acc {row['reward_accuracy']:.4f}"
        ppl += f"  margin {row['reward_margin']:.4f}"
    name = METRIC_LABELS.get(row.get("metric", "accuracy"), row.get("metric", "acc"))
    scored = "not scored (--eval-every)" if row["accuracy"] is None else (
        f"{name} {row['accuracy']:.4f}  loss {math.nan if row['loss'] is None else row['loss']:.4f}")
    return (f"round {row['round']:>3}  {scored}{ppl}  "
            f"agg_err {err}  up {row['bytes_up'] / 1e6:.2f} MB  down {row['bytes_down'] / 1e6:.2f} MB  "
            f"{row['seconds']:.1f}s (eval {row.get('eval_seconds', 0.0):.1f}s){eps}")
