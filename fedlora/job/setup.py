"""The one way a job's data and model are set up: by the simulator, the ServerApp and a client.

* :func:`splits`: the examples clients train on (``--data``, minus the held-out split unless
  ``--test-data`` is given) and the examples the global model is evaluated on (the split, or
  ``--test-data``; at most ``--eval-max`` of them), from one read of the data;
* :func:`training_data`: the first of the two alone;
* :func:`client_share`: one client's examples (its partition, or its own file);
* :func:`personal_split`: which of them the client holds out to measure its own model;
* :func:`public_data`: the public ``--init-data`` examples the server initialises from;
* :func:`prepared`: encoded data completed from the untrained model (DPO's reference);
* :func:`build_model`: the base model wrapped with client slots for the job's task and
  strategy;
* :func:`resolve_max_length`: ``--task sft``'s default ``--max-length``, read from the data once,
  where a job starts (``fedlora-sim``, ``fedlora-server``): clients get the number in the run config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fedlora.data.groups import with_groups
from fedlora.data.loading import TextDataset, natural, shares, split
from fedlora.errors import UserError, say, warn_once
from fedlora.job.schema import JobConfig
from fedlora.job.warm import Recent, job_key
from fedlora.models.adapter import check_correction, fold_into_base, other_head, read_adapter
from fedlora.models.context import context_length
from fedlora.models.correction import CALIBRATION_ROWS, add_correction, calibration_batches, quantized_layers
from fedlora.models.export import read_labels
from fedlora.models.hub import head_labels, load_model, load_tokenizer, read_tokenizer_config
from fedlora.models.lora import linear_shape
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.strategies import AdapterPlan
from fedlora.tasks import INIT, TEST, Task, get_task


def training_data(cfg: JobConfig, task: Task | None = None) -> TextDataset:
    """Every client's examples together (partitioned by :func:`client_share` or the simulator)."""
    ds = labeled_data(cfg, task or get_task(cfg.task))
    return ds if cfg.test_data else split(ds, cfg.test_fraction, cfg.seed)[0]


def labeled_data(cfg: JobConfig, task: Task) -> TextDataset:
    """``--data``'s examples; for a task of classes, of two labels at least, numbered as the model's
    head numbers them where it was trained on the same labels (:func:`in_head_order`).

    Raises
    ------
    UserError
        What the task's reader refuses, or a classification ``--data`` of one label.
    """
    ds = task.load(cfg.data, cfg)
    if cfg.partition_column:
        ds = with_groups(ds, cfg.data, cfg.partition_column)
    if not task.classes:
        return ds
    used = sorted(set(ds.labels or []))  # a ClassLabel's names may name classes no row has
    if len(used) < 2:
        raise UserError(f"--data {cfg.data} has one label ({ds.label_names[used[0]]!r}): a classifier learns"
                        " from two or more; check --label-column, or add the other classes' rows")
    return in_head_order(ds, cfg.model)


def splits(cfg: JobConfig, task: Task | None = None) -> tuple[TextDataset, TextDataset, list[str]]:
    """``(training examples, test examples, label names)``: the test examples are the held-out
    split of ``--data`` or ``--test-data`` (relabeled to ``--data``'s labels), its first
    ``--eval-max`` rows."""
    task = task or get_task(cfg.task)
    ds = labeled_data(cfg, task)
    if not cfg.test_data:
        train, test = split(ds, cfg.test_fraction, cfg.seed)
    else:
        train, test = ds, task.load(cfg.test_data, cfg, role=TEST)
        if task.classes:
            test = test.relabel(ds.label_names, f"--test-data {cfg.test_data}")
    return train, test.head(cfg.eval_max), ds.label_names


def in_head_order(ds: TextDataset, model: str) -> TextDataset:
    """``ds`` with its labels numbered as ``model``'s classification head numbers them, where the head
    was trained on the same label names (its ``id2label``): a fine-tuned classifier keeps its rows'
    meaning. Other data keeps its own order (a ``ClassLabel``'s, else sorted)."""
    names = head_labels(model)
    if names is None or sorted(names) != sorted(ds.label_names) or names == ds.label_names:
        return ds
    warn_once(f"labels numbered as the head of {model} numbers them (its id2label): {', '.join(names)}")
    return ds.relabel(names, "--data")


def public_data(cfg: JobConfig, task: Task, tokenizer,
                label_names: list[str]) -> dict[str, torch.Tensor] | None:
    """``--init-data``, encoded for the task (labels mapped to ``--data``'s), or None without it.

    Raises
    ------
    UserError
        The file is missing, unreadable, lacks the task's columns or has labels ``--data`` lacks.
    """
    if not cfg.init_data:
        return None
    try:
        ds = task.load(cfg.init_data, cfg, role=INIT)
        if task.classes:
            ds = ds.relabel(label_names, "the file")
    except UserError as exc:
        raise UserError(f"--init-data: {exc}") from None
    return task.encode(tokenizer, ds, cfg)


def prepared(task: Task, fm: FederatedModel, cfg: JobConfig, data):
    """``data`` (encoded, an evaluation set, or None) completed by :meth:`Task.prepare` from the
    untrained ``fm``: DPO's reference log-probabilities. Every entry point calls it where it sets
    the job up, before any round."""
    if data is not None:
        task.prepare(fm, data, cfg)
    return data


def client_share(cfg: JobConfig, partition_id: int, num_partitions: int) -> TextDataset:
    """Client ``partition_id``'s share of the job's training data (``num_partitions`` shares: the
    job's ``--num-clients``, as ``fedlora-sim`` splits it)."""
    if num_partitions != cfg.num_clients:  # other shares: a part of the data no client holds
        raise UserError(f"--num-partitions {num_partitions} differs from the server's --num-clients"
                        f" {cfg.num_clients}: pass --num-partitions {cfg.num_clients}, so the shares are"
                        " the job's")
    if not 0 <= partition_id < num_partitions:
        raise UserError(f"partition-id {partition_id} is not in 0..{num_partitions - 1}")
    train, share = _JOBS.get(job_key(cfg), lambda: _partitioned(cfg))
    [mine] = share([partition_id])
    return train.subset(mine)


Shares = Callable[[Sequence[int]], list[list[int]]]
JOBS_KEPT = 2
"""Jobs whose training data and partition a process keeps (:func:`client_share`)."""
_JOBS: Recent[tuple[TextDataset, Shares]] = Recent(JOBS_KEPT)


def _partitioned(cfg: JobConfig) -> tuple[TextDataset, Shares]:
    """The job's training data, and :func:`fedlora.data.loading.shares` of it: read and drawn once a
    process (a client rebuilt for each message read the whole file again: 0.3 s at 25,000 rows, and
    about a second to draw a Dirichlet partition)."""
    train = training_data(cfg)
    return train, shares(train, cfg.num_clients, cfg.partition, cfg.alpha, cfg.seed)


def personal_split(cfg: JobConfig, client: int, n: int) -> tuple[list[int], list[int]]:
    """``(train positions, personal test positions)`` among a client's ``n`` examples.

    ``--personal-test-fraction`` of them (at least one, leaving one to train on) are held out
    to measure the client's own model; drawn from ``(seed, client)``, so the simulator and the
    deployed client hold out the same ones. Without the flag every example trains.
    """
    if cfg.personal_test_fraction <= 0:
        return list(range(n)), []
    if n < 2:
        raise UserError(f"client {client} has {n} example(s): too few to hold out a personal test"
                        " set; use fewer clients or drop --personal-test-fraction")
    k = min(max(1, round(cfg.personal_test_fraction * n)), n - 1)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + client)
    order = torch.randperm(n, generator=gen).tolist()
    return sorted(order[k:]), sorted(order[:k])


def build_model(cfg: JobConfig, ranks: list[int], plan: AdapterPlan, num_labels: int | None = None,
                labels: list[str] | None = None) -> tuple[FederatedModel, object, str]:
    """``(model with len(ranks) client slots, tokenizer, base model path)`` on ``cfg.device``.

    ``--precision bf16`` loads the frozen base in bfloat16 (the adapters and heads stay fp32);
    ``--quantize`` its linear layers in 4 or 8 bits (bitsandbytes), computed in that dtype.
    ``labels``: the job's label names, where known, which an ``--init-adapter``'s head must have.
    """
    task = get_task(cfg.task)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model, tokenizer, path, new = load_model(cfg.model, task.model_kind, task.head_outputs(num_labels or 0),
                                             seed=cfg.seed, dtype=dtype, quantize=cfg.quantize,
                                             double_quant=cfg.double_quant, device=cfg.device,
                                             problem_type=task.problem_type)
    check_context(cfg.max_length, model.config, tokenizer, model, cfg.max_new_tokens)
    try:
        fm = FederatedModel(model, AdapterConfig(
            ranks=ranks, alpha=cfg.lora_alpha, target_modules=cfg.target_modules, plan=plan,
            train_head=task.trains_head, gradient_checkpointing=cfg.gradient_checkpointing,
            fold_rank=cfg.fold_rank, new_modules=new, dropout=cfg.lora_dropout))
    except ValueError as exc:  # nothing matches --target-modules, or the model cannot checkpoint
        raise UserError(str(exc)) from None
    check_rank_bound("--fold-rank", cfg.fold_rank, fm.adapters.values(), "adapted")
    check_rank_bound("--quant-correction", cfg.quant_correction, quantized_layers(fm.model).values(),
                     "quantized")
    if plan.core:
        check_core_rank(cfg.strategy, max(ranks), fm.adapters.values())
    if cfg.init_adapter:  # before the heads are zeroed or frozen: round 0 is base + this adapter
        adapter = read_adapter(cfg.init_adapter)
        check_correction(adapter, cfg.quantize, correcting=bool(cfg.quant_correction))
        fold_into_base(fm, adapter, cfg.model, path, head=init_head(adapter, fm, labels, cfg.head))
    if cfg.quant_correction:
        correct_base(fm, cfg, task, tokenizer, path)
    if cfg.head == "zero":
        fm.zero_heads()
    fm.freeze_heads(cfg.head in ("frozen", "public"))  # public: the server trains it before round 1
    return fm.to(torch.device(cfg.device)), tokenizer, str(path)


def init_head(adapter, fm: FederatedModel, labels: list[str] | None, head: str) -> bool:
    """Whether ``--init-adapter``'s task head is loaded: not with ``--head zero`` (a new head), nor
    where there is none on either side, nor with ``--head public`` where it was trained on other labels
    (the public file trains a head afresh).

    Raises
    ------
    UserError
        Its head was trained on other labels than the job's (as its export recorded them), or has
        another shape (one line: start a new head with ``--head zero``, or train on its labels).
    """
    if not adapter.head or not fm.heads or head == "zero":
        return False
    theirs = read_labels(adapter.path)
    other = other_head(adapter, fm)
    if other or (theirs is not None and labels is not None and theirs != labels):
        if head == "public":
            return False
        had = f"the labels {', '.join(map(repr, theirs))}" if theirs else f"another shape ({other})"
        mine = f"this job's data has {', '.join(map(repr, labels))}" if labels else "this job's differs"
        raise UserError(f"--init-adapter {str(adapter.path)!r} holds a head trained on {had}, and {mine}:"
                        " pass --head zero (or public) to start a new head from the adapter's update, or"
                        " train on data with its labels")
    return True


def check_rank_bound(flag: str, rank: int, layers, kind: str) -> None:
    """Refuse a rank ``flag`` (``--fold-rank``, ``--quant-correction``) that bounds nothing: at
    least every one of ``layers``' full rank ``min(d_out, d_in)``, where it would keep each layer's
    whole matrix, as many numbers as the unquantized weights or more."""
    full = max((min(linear_shape(m)) for m in layers), default=0)
    if rank and full and rank >= full:
        raise UserError(f"{flag} {rank} is at least the full rank of every {kind} layer (the largest is"
                        f" {full}), so it would keep whole matrices, not a low-rank part: pass a rank below"
                        f" {full}, or drop {flag}")


def check_core_rank(strategy: str, rank: int, layers) -> None:
    """Refuse a LoRA-SB rank above an adapted layer's ``min(d_out, d_in)``: its shared, frozen ``A``
    (``r × d_in``) and ``B`` (``d_out × r``) are orthonormal, which needs ``r`` directions on each side
    (found when the job starts, not after its initialisation phases)."""
    small = min((min(linear_shape(m)) for m in layers), default=0)
    if small and rank > small:
        raise UserError(f"--strategy {strategy}: --rank {rank} exceeds {small}, the smaller side of an"
                        f" adapted layer; LoRA-SB's shared A (r × d_in) and B (d_out × r) are orthonormal,"
                        f" so r ≤ min(d_out, d_in): pass --rank {small} or less")


def check_context(max_length: int | None, config, tokenizer, model=None, new_tokens: int = 0) -> None:
    """Refuse a ``--max-length``, or ``--max-new-tokens`` (``new_tokens``), beyond the tokens the model
    takes (:func:`context_length`; ``model``: the model itself, where it is at hand)."""
    context = context_length(config, tokenizer, model)
    if new_tokens and context and new_tokens >= context:  # it generated on past the positions, for hours
        raise UserError(f"--max-new-tokens {new_tokens} reaches past the {context} positions this model"
                        " takes: pass fewer (0: the longest reference answer's)")
    if max_length and context and max_length > context:
        given = getattr(config, "max_position_embeddings", None)
        if context_length(config, None, model) != context:
            source = "tokenizer's model_max_length"
        elif given == context:
            source = "max_position_embeddings"
        else:  # RoBERTa's: position ids start after the pad's
            source = (f"max_position_embeddings {given}, less {given - context}: its position ids start"
                      f" at {given - context}")
        raise UserError(f"--max-length {max_length} exceeds the {context} positions this model takes"
                        f" (its {source}); pass --max-length {context} or less")


def correct_base(fm: FederatedModel, cfg: JobConfig, task: Task, tokenizer, path) -> None:
    """``--quant-correction``: the frozen correction beside every quantized layer of ``fm``, its input
    scales read from the first examples of ``--quant-calibration`` (else ``--init-data``; with
    neither, none: the plain SVD)."""
    spec = cfg.quant_calibration or cfg.init_data
    data = None
    if spec:
        flag = "--quant-calibration" if cfg.quant_calibration else "--init-data"
        try:
            data = task.encode(tokenizer, task.load(spec, cfg, role=INIT).head(CALIBRATION_ROWS), cfg)
        except UserError as exc:
            raise UserError(f"{flag}: {exc}") from None
    note = {"quantize": cfg.quantize, "rank": cfg.quant_correction, "calibration": spec or None}
    add_correction(fm, path, cfg.quant_correction, calibration_batches(data), note)


#: ``--task sft`` without ``--max-length``: the tokenized length (prompt and response, as rendered)
#: that this share of the training examples fits in, rounded up to a multiple of 8 and to the
#: longest response (never cut), at most :data:`LENGTH_CAP` and the model's context; read from a
#: seeded sample of at most :data:`LENGTH_SAMPLE` training examples.
LENGTH_QUANTILE = 0.95
LENGTH_CAP = 512
LENGTH_SAMPLE = 2000
_DERIVED: dict[tuple, tuple[int, int, int]] = {}  # one derivation per data and model (fedlora-compare)


def derived_max_length(totals: list[int], musts: list[int], context: int | None = None) -> tuple[int, int]:
    """``(--max-length, the quantile's length)`` from each example's tokens (``totals``) and those no
    cut may shorten (``musts``): the :data:`LENGTH_QUANTILE` quantile (nearest rank: the smallest
    length that many of the examples fit in), above the longest of ``musts`` (which leaves its prompt a
    token), rounded up to a multiple of 8, at most :data:`LENGTH_CAP` and ``context``."""
    ranked = sorted(totals)
    quantile = ranked[max(1, math.ceil(LENGTH_QUANTILE * len(ranked))) - 1]
    need = max(quantile, max(musts) + 1)
    return min(-(-need // 8) * 8, LENGTH_CAP, context or LENGTH_CAP), quantile


def check_inputs(cfg: JobConfig) -> None:
    """Read what the job reads, before a command writes anything: its data (columns and labels, the
    test file's too) and its model's tokenizer and positions (no weight). A deployment builds its job
    in the ServerApp, after ``--out`` is prepared, so its bad input is refused here first."""
    train, _, _ = splits(cfg)
    if cfg.partition == "natural":  # a client per group: as many clients as groups
        natural(train.groups or [], cfg.num_clients)
    elif cfg.num_clients > len(train):  # only clients on their own --data can join such a job
        warn_once(f"--num-clients {cfg.num_clients} is more than the {len(train)} training examples of --data"
                  f" {cfg.data}: a client on a --partition-id of them would have none, so only clients on"
                  " their own --data can take part")
    tokenizer, config = read_tokenizer_config(cfg.model)
    check_context(cfg.max_length, config, tokenizer, new_tokens=cfg.max_new_tokens)


def resolve_max_length(cfg: JobConfig, quiet: bool = False) -> None:
    """Give ``cfg.max_length`` its value when it was left to the data (``--task sft`` without
    ``--max-length``: :func:`derived_max_length` of its training examples), and print it in one line
    unless ``quiet``; nothing otherwise."""
    task = get_task(cfg.task)
    if cfg.max_length is not None or not task.length_from_data:
        return
    key = tuple(getattr(cfg, f) for f in ("task", "model", "data", "test_data", "test_fraction", "seed",
                                          "text_column", "label_column", "prompt_template", "label_words",
                                          "system_prompt", "chat_template", "columns"))
    if key not in _DERIVED:
        tokenizer, context = load_tokenizer(cfg.model)
        ds = training_data(cfg, task)
        if len(ds) > LENGTH_SAMPLE:
            gen = torch.Generator().manual_seed(cfg.seed)
            ds = ds.subset(sorted(torch.randperm(len(ds), generator=gen)[:LENGTH_SAMPLE].tolist()))
        totals, musts = task.example_lengths(tokenizer, ds, cfg)
        _DERIVED[key] = (*derived_max_length(totals, musts, context), len(totals))
        if not quiet:
            value, quantile, n = _DERIVED[key]
            cap = min(LENGTH_CAP, context or LENGTH_CAP)
            say(f"--max-length {value} (the {LENGTH_QUANTILE * 100:.0f}th percentile of {n:,}"
                f" tokenized training examples is {quantile:,} tokens; rounded up to a multiple of 8, at"
                f" most {cap}); pass --max-length to choose")
    cfg.max_length = _DERIVED[key][0]
