"""Score a base model and exported adapters on one test set, as a run scores its global model
(``fedlora-eval``).

The test examples are those a run evaluates with the same flags: ``--test-data`` (at most
``--eval-max`` of them), or, with ``--data`` alone, its held-out split (``--test-fraction``,
``--seed``). Each model is built the way a job builds its model (:func:`fedlora.job.setup.
build_model`), an adapter's factors are loaded into its one slot
(:mod:`fedlora.models.adapter`), and the task's own evaluation (``Task.evaluate``: the same
batched code as every round's) scores it. The base alone is the same model with zero adapters.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from fedlora.data.loading import TextDataset
from fedlora.errors import UserError, say
from fedlora.job.schema import JobConfig
from fedlora.job.setup import build_model, derived_max_length, resolve_max_length, splits
from fedlora.models.adapter import (
    PeftAdapter,
    check_adapter,
    check_correction,
    linear_shapes,
    load_whole,
    other_head,
    padded_state,
    read_adapter,
)
from fedlora.models.export import read_labels, read_task
from fedlora.models.hub import load_tokenizer, resolve_model_path
from fedlora.models.model import FederatedModel
from fedlora.models.state import apply_global
from fedlora.strategies.plan import LORA
from fedlora.tasks import ANSWER_METRICS, EVALUATIONS, TEST, Task, get_task

#: The job fields an evaluation reads: ``fedlora-eval``'s job flags.
EVAL_FIELDS = ("task", "model", "data", "text_column", "label_column", "test_data", "test_text_column",
               "test_label_column", "test_fraction", "seed", "eval_max", "eval_batch_size", "max_length",
               "padding", "device", "precision", "quantize", "double_quant", "quant_correction",
               "quant_calibration", "init_text_column", "init_label_column", "target_modules",
               "prompt_template", "label_words", "system_prompt", "chat_template", "max_new_tokens", "eval",
               "metric", "dpo_beta", "dpo_sft_weight", "columns", "fewshot")
#: What a row of :func:`score_models` names the bare base model.
BASE = "base"


def eval_examples(cfg: JobConfig, task: Task,
                  adapters: list[PeftAdapter] = ()) -> tuple[TextDataset, list[str]]:
    """``(test examples, label names)``: the run's (``--data`` given: :func:`fedlora.job.setup.splits`),
    or ``--test-data``'s own rows (no ``--data``), whose labels a task with a head numbers as the
    ``adapters`` were trained (the label names their export recorded: :func:`adapter_labels`).

    Raises
    ------
    UserError
        Neither ``--data`` nor ``--test-data``; for a task with a head, an adapter whose recorded labels
        differ from ``--data``'s or the other adapters', one without them and no ``--data``, or a test
        label the adapters lack.
    """
    if cfg.data:
        _, test, names = splits(cfg, task)
        if task.classes:
            adapter_labels(adapters, names)
        return test, names
    if not cfg.test_data:
        raise UserError("fedlora-eval needs examples: --test-data FILE, or --data FILE (or bbcnews-instruct)"
                        " to score its held-out split as the run did (same --seed and --test-fraction)")
    test = task.load(cfg.test_data, cfg, role=TEST)
    names = adapter_labels(adapters) if task.classes and adapters else None
    if names is None:
        return test.head(cfg.eval_max), test.label_names
    unknown = [n for n in test.label_names if n not in names]
    if unknown:
        raise UserError(f"--test-data {cfg.test_data}: label(s) {', '.join(map(repr, unknown[:5]))} are not"
                        f" among the labels adapter {str(adapters[0].path)!r} was trained on"
                        f" ({', '.join(map(repr, names))}); score a test file of those labels")
    return test.relabel(names).head(cfg.eval_max), names


def adapter_labels(adapters: list[PeftAdapter], data: list[str] | None = None) -> list[str] | None:
    """The label names the ``adapters`` were trained on, in id order (what each export recorded:
    :func:`fedlora.models.export.read_labels`), checked against ``--data``'s ``data`` where given.

    Raises
    ------
    UserError
        Two adapters (or an adapter and ``--data``) with different labels; without ``data``, an
        adapter that records none (exported by an older fedlora).
    """
    names, source = data, "--data"
    for adapter in adapters:
        path, mine = str(adapter.path), read_labels(adapter.path)
        if mine is None and data is None:
            raise UserError(f"adapter {path!r} records no label names (exported by an older fedlora): pass"
                            " the run's training file as --data, so that its labels number the test file's")
        if mine is None:
            continue
        if names is None:
            names, source = mine, f"adapter {path!r}"
        elif mine != names:
            raise UserError(f"adapter {path!r} was trained on the labels {', '.join(map(repr, mine))}, and"
                            f" {source} has {', '.join(map(repr, names))}: score it with its run's --data")
    return names


def resolve_eval_length(cfg: JobConfig, task: Task, examples: TextDataset, quiet: bool = False) -> None:
    """Give ``--max-length`` its value when it was left to the data: from ``--data`` as the run derived
    it, or, without ``--data``, by the same rule from the test examples as ``--eval`` scores them
    (``mc-letters``: their choices listed in the prompt), printed unless ``quiet``."""
    if cfg.data or cfg.max_length is not None or not task.length_from_data:
        resolve_max_length(cfg, quiet=quiet)
        return
    tokenizer, context = load_tokenizer(cfg.model)
    examples = EVALUATIONS[cfg.eval].scored(examples, cfg)  # --fewshot's shots, mc-letters' choices
    cfg.max_length, quantile = derived_max_length(*task.example_lengths(tokenizer, examples, cfg), context)
    if not quiet:
        say(f"--max-length {cfg.max_length} (from the {len(examples):,} test examples, whose 95th"
            f" percentile is {quantile} tokens); pass --max-length to choose")


def check_adapters(cfg: JobConfig, task: Task, paths: list[Path]) -> list[PeftAdapter]:
    """The adapters in ``paths``, each checked against ``--model`` and against ``--task`` where its export
    recorded the task that trained it (one-line refusals: a regression's one-output head is no
    classifier's)."""
    adapters = [read_adapter(p) for p in paths]
    for adapter in adapters:
        theirs = read_task(adapter.path)
        if theirs is not None and theirs != task.name:
            raise UserError(f"adapter {str(adapter.path)!r} was trained by --task {theirs}, whose head is not"
                            f" --task {task.name}'s: score it with --task {theirs}")
    if adapters:
        model_path = resolve_model_path(cfg.model)
        shapes = linear_shapes(model_path, task.model_kind)
        for adapter in adapters:
            check_adapter(adapter, cfg.model, model_path, shapes)
            check_correction(adapter, cfg.quantize)
    return adapters


def load_scored_model(cfg: JobConfig, task: Task, adapter: PeftAdapter | None,
                      num_labels: int) -> tuple[FederatedModel, object]:
    """``(model with one slot, tokenizer)``: ``--model`` with ``adapter`` loaded (scale 1, the
    adapter's target modules), or with zero adapters on ``--target-modules``. The base gets its
    ``--quant-correction`` (a run's round 0) unless the adapter holds it already."""
    if adapter is not None and adapter.correction:
        cfg = replace(cfg, quant_correction=0, quant_calibration="")
    if adapter is None:
        fm, tokenizer, _ = build_model(replace(cfg, rank=1), [1], LORA, num_labels)
        for layer in fm.adapters.values():
            A, B = layer.get_slot(0)
            layer.set_slot(0, torch.zeros_like(A), torch.zeros_like(B))
        return fm, tokenizer
    r = adapter.rank
    job = replace(cfg, rank=r, lora_alpha=float(r), target_modules=sorted(adapter.factors))
    fm, tokenizer, _ = build_model(job, [r], LORA, num_labels)
    missing = sorted(f"{name}.weight" for name in fm.heads if f"{name}.weight" not in adapter.head)
    other = other_head(adapter, fm)
    if missing or other:
        why = f"has no {missing[0]}" if missing else f"holds {other},"
        raise UserError(f"adapter {str(adapter.path)!r} {why} for --task {cfg.task}'s head: pass an"
                        " adapter of that task (and of its labels)")
    apply_global(fm, padded_state(adapter, r), {})
    load_whole(fm, adapter)
    return fm, tokenizer


def score_models(cfg: JobConfig, adapters: list[Path], base: bool, quiet: bool = False) -> list[dict]:
    """One row per model (the bare base first when ``base`` or no adapter is given, then each adapter
    in order): ``model``, ``adapter``, ``metric`` (what ``accuracy`` is), the task's metrics and
    ``seconds`` (the evaluation's)."""
    task = get_task(cfg.task)
    checked = check_adapters(cfg, task, adapters)
    examples, names = eval_examples(cfg, task, checked)
    resolve_eval_length(cfg, task, examples, quiet)
    data, rows = None, []
    for adapter in ([None] if base or not checked else []) + checked:
        fm, tokenizer = load_scored_model(cfg, task, adapter, len(names))
        if data is None:  # one tokenizer for every model: --model's
            data = task.eval_set(tokenizer, examples, cfg)
            task.prepare(fm, data, cfg)  # DPO's reference: this base with the adapter off
        t0 = time.perf_counter()
        metrics = task.evaluate(fm, data, cfg)
        rows.append({"model": BASE if adapter is None else str(adapter.path),
                     "adapter": None if adapter is None else str(adapter.path),
                     "metric": task.headline(data), **metrics,
                     "seconds": round(time.perf_counter() - t0, 3)})
        del fm
    return rows


def _cell(key: str, value) -> str:
    if isinstance(value, float) and (key.endswith(("accuracy", "accuracy_norm", "f1")) or key in
                                     {m.column for m in ANSWER_METRICS.values()}):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        if key in ("loss", "reward_margin", "mcc", "pearson", "spearman", "mse"):
            return f"{value:.4f}"
        return f"{value:.4g}" if key == "perplexity" else f"{value:.1f}"
    return str(value)


def eval_table(rows: list[dict]) -> str:
    """The rows as one Markdown table: the model, its headline metric first, then the others."""
    head = rows[0]["metric"]
    keys = [head] + [k for k in rows[0] if k not in ("model", "adapter", "metric", "accuracy", head)]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {r['model']} | " + " | ".join(_cell(k, r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
