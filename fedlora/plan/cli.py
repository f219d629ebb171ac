"""``fedlora-plan``: a job's memory per client and per pass, the clients a pass fits in ``--memory``,
and the bytes each client sends and receives per round under --strategy (every strategy where the
job does not name one), from the model's
shape alone: the model is built on the meta device and no weight is read.

    fedlora-plan --model llama-3.1-8b --task sft --quantize nf4 --precision bf16 --rank 16 \\
        --batch-size 4 --max-length 512 --device cuda --memory 24GB,80GB

``--model`` is what ``fedlora-sim`` takes (a folder, a ``.gguf`` file, ``smollm2``) or a config-only
preset (:data:`fedlora.plan.presets.PRESETS`); ``--models A,B,...`` prints one table over several.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fedlora.errors import UserError, command
from fedlora.job.checks import check_fold_rank, check_job_args, check_quant_correction
from fedlora.job.configfile import add_config_argument, parse_args, read_config
from fedlora.job.flags import Parser, add_job_arguments, to_config
from fedlora.job.schema import JobConfig
from fedlora.job.setup import check_context, resolve_max_length
from fedlora.plan.memory import MemoryPlan, default_response_tokens, plan_memory
from fedlora.plan.presets import PRESETS
from fedlora.plan.shape import ModelShape, build_shape, model_config
from fedlora.plan.traffic import RoundBytes, plan_traffic
from fedlora.strategies import STRATEGIES
from fedlora.tasks import get_task

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """``24GB`` -> 24·10⁹ bytes, ``80GiB`` -> 80·2³⁰ (argparse type; KB/MB/GB/TB are powers of 1000,
    KiB/MiB/GiB/TiB of 1024, B bytes). A bare number is refused: ``--memory 24`` meant 24 GB, not bytes."""
    got = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if got and not got.group(2):
        raise argparse.ArgumentTypeError(f"--memory {text.strip()} has no unit: write {got.group(1)}GB"
                                         f" (10^9 bytes) or {got.group(1)}GiB (2^30 bytes)")
    if not got or got.group(2).lower() not in UNITS or float(got.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"--memory takes sizes like 24GB or 80GiB, got {text!r}")
    return int(float(got.group(1)) * UNITS[got.group(2).lower()])


def parse_memories(text: str) -> list[tuple[str, int]]:
    """``8GB,24GB`` -> ``[("8GB", 8·10⁹), ("24GB", 24·10⁹)]``."""
    return [(item.strip(), parse_memory(item)) for item in text.split(",") if item.strip()]


def human(n: float) -> str:
    """Bytes in binary units: ``5.21 GiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def human_wire(n: float) -> str:
    """Traffic in decimal units, as the README's tables give it: ``3.06 MB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fedlora-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(p)
    add_job_arguments(p)
    plan = p.add_argument_group("plan")
    plan.add_argument("--memory", type=parse_memories, default=[], metavar="SIZES",
                      help="device memory, one or more comma-separated (24GB, 80GiB): the most clients a"
                           " pass fits in each")
    plan.add_argument("--models", default="", help="plan each of these models (comma-separated) and print"
                      f" one table; presets: {', '.join(PRESETS)}")
    plan.add_argument("--response-tokens", type=int, default=None, metavar="N",
                      help="--task sft: response tokens per row, the positions whose logits are computed"
                           " (default: a quarter of --max-length)")
    plan.add_argument("--num-labels", type=int, default=None,
                      help="--task classification: the head's classes (default: the labels of --data)")
    plan.add_argument("--clients-per-pass", type=int, default=None, metavar="K",
                      help="clients trained together in one pass (default: the round's clients)")
    plan.add_argument("--json", type=Path, default=None, help="also write the plan to this JSON file")
    return p


def check_args(args: argparse.Namespace) -> JobConfig:
    """The job of the flags, checked as ``fedlora-sim`` checks it, except that planning a 4- or
    8-bit base needs no bitsandbytes and ``--device cuda`` no GPU."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or auto")
    cfg = to_config(args, device=device)
    if cfg.double_quant and cfg.quantize not in ("nf4", "fp4"):
        raise UserError("--double-quant quantizes the scales of 4-bit blocks: it needs --quantize nf4 or fp4")
    planned = {"quantize": "none", "double_quant": False, "fold_rank": 0, "quant_correction": 0,
               "quant_calibration": "",                                # nothing is loaded or held out
               "personal_test_fraction": cfg.personal_test_fraction or 0.2}
    check_job_args(replace(cfg, **{k: v for k, v in planned.items() if hasattr(cfg, k)}))
    check_fold_rank(cfg)  # and the quantized base's own flags, as a job checks them (no bitsandbytes)
    check_quant_correction(cfg)
    if args.json is not None and (args.json.is_dir() or not args.json.absolute().parent.is_dir()):
        why = "is a folder" if args.json.is_dir() else "is in no existing folder"
        raise UserError(f"--json {str(args.json)!r} {why}: pass a file path such as plan.json")
    for name in ("response_tokens", "num_labels", "clients_per_pass"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if cfg.max_length is None:  # --task sft reads it from the data with the model's tokenizer
        models = [m.strip() for m in (args.models or "").split(",") if m.strip()] or [cfg.model]
        for m in models:
            model_config(m)  # an unknown model: one line that lists the presets
        if any(m in PRESETS for m in models):
            raise UserError("--task sft without --max-length reads it from the data with the model's"
                            " tokenizer, and a preset has none: pass --max-length (e.g. 512)")
        resolve_max_length(cfg)
    task = get_task(cfg.task)
    if args.num_labels is not None and task.trains_head and not task.classes:
        raise UserError(f"--num-labels counts a classifier's classes, and --task {task.name}'s head has"
                        f" {task.head_outputs(0)} output: drop --num-labels")
    if args.num_labels is None:
        args.num_labels = len(task.load(cfg.data, cfg).label_names) if task.classes else 2
    return cfg


def strategy_traffic(cfg: JobConfig, shape: ModelShape,
                     names: list[str] | None = None) -> dict[str, list[RoundBytes] | str]:
    """The bytes per client per round of each of ``names`` (default: every registered strategy) for
    the job (its options for the job's own strategy, defaults for the others), or why that strategy
    cannot run it."""
    out: dict[str, list[RoundBytes] | str] = {}
    for name in names or sorted(STRATEGIES):
        cls = STRATEGIES[name]
        if cfg.ranks and len(set(cfg.ranks)) > 1 and not cls.heterogeneous_ranks:
            out[name] = "needs one rank for every client"
            continue
        options = cfg.strategy_options if name == cfg.strategy else ""
        job = replace(cfg, strategy=name, strategy_options=options)
        try:
            out[name] = plan_traffic(job, shape.layers, shape.heads)
        except (UserError, ValueError) as exc:
            out[name] = str(exc).splitlines()[0]
    return out


FIRST_ROUNDS = 3
"""Rounds the traffic table shows one by one (after round 0); later ones share a column."""


def traffic_lines(traffic: dict[str, list[RoundBytes] | str], rounds: int) -> list[str]:
    """The traffic table: round 0 and each of the first :data:`FIRST_ROUNDS` rounds' largest upload
    and download over its clients, the largest of the later rounds in one column, and the most one
    client sends and receives over the whole run."""
    last = min(rounds, FIRST_ROUNDS)
    spans = [(t, t) for t in range(last + 1)] + ([(last + 1, rounds)] if rounds > last else [])
    heads = [f"round {a}" if a == b else f"rounds {a}–{b}, largest" for a, b in spans]
    heads.append(f"run of {rounds} round{'' if rounds == 1 else 's'}, most per client")
    lines = ["| strategy | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for name, rows in traffic.items():
        if isinstance(rows, str):
            lines.append(f"| `{name}` | {rows} |" + " |" * (len(heads) - 1))
            continue
        cells = [_largest(rows[a:b + 1]) for a, b in spans]
        lines.append(f"| `{name}` | " + " | ".join([*cells, _run_total(rows)]) + " |")
    return lines


def _largest(rows: list[RoundBytes]) -> str:
    """``↑ up ↓ down``: the largest upload and download of any client in ``rows`` ('–': no client)."""
    if not any(r.up for r in rows):
        return "–"
    return (f"↑ {human_wire(max(max(r.up) for r in rows if r.up))}"
            f" ↓ {human_wire(max(max(r.down) for r in rows if r.down))}")


def _run_total(rows: list[RoundBytes]) -> str:
    """``↑ up ↓ down``: the most any one client sends, and receives, over every round of ``rows``."""
    up: dict[int, int] = {}
    down: dict[int, int] = {}
    for r in rows:
        for c, u, d in zip(r.clients, r.up, r.down, strict=True):
            up[c], down[c] = up.get(c, 0) + u, down.get(c, 0) + d
    return f"↑ {human_wire(max(up.values()))} ↓ {human_wire(max(down.values()))}" if up else "–"


def chosen_strategy(args: argparse.Namespace) -> bool:
    """Whether the job names its strategy (``--strategy``, or ``--config``'s file): the traffic table
    then plans it alone; else every strategy, to compare them."""
    return "strategy" in args.typed or (args.config is not None and "strategy" in read_config(args.config))


def memory_lines(mem: MemoryPlan, cfg: JobConfig, clients: int, memories: list[tuple[str, int]]) -> list[str]:
    """The memory table of one model, and the clients a pass fits in each memory."""
    ckpt = "on" if cfg.gradient_checkpointing else "off"
    other = "off" if cfg.gradient_checkpointing else "on"
    rows = [("frozen base, once per pass", mem.base),
            (f"folds beside the quantized base after {cfg.rounds} rounds, once per pass", mem.folds),
            ("shared frozen factors (LoRA-SB's A, B), once per pass", mem.shared),
            ("one dequantized layer at a time, once per pass", mem.transient),
            ("adapter and head, per client", mem.adapter), ("gradients, per client", mem.gradients),
            (f"optimizer ({cfg.optimizer}), per client", mem.optimizer),
            (f"activations, checkpointing {ckpt}, per client", mem.activations),
            (f"(activations with checkpointing {other})", mem.activations_other),
            ("freed blocks the CPU allocator keeps, per client (--device cpu)", mem.allocator),
            (f"DP-SGD extra, per client{'' if mem.dp_on else ' (with --dp sample)'}", mem.dp),
            ("**per client**", mem.per_client), (f"**pass of {clients} clients**", mem.pass_bytes(clients))]
    lines = ["| memory | bytes |", "|---|---:|"]
    lines += [f"| {k} | {human(v)} |" for k, v in rows if v or "**" in k]
    for label, size in memories:
        k = mem.largest_pass(size)
        lines.append(f"{label}: at most {k} client{'' if k == 1 else 's'} per pass")
    return lines


def describe(cfg: JobConfig, shape: ModelShape, response: int) -> str:
    dims = shape.dims()
    params = sum(t.numel for t in shape.base)
    base = "fp32" if cfg.precision == "fp32" else "bf16"
    if cfg.quantize != "none":
        base = f"{cfg.quantize}{' (double quant)' if cfg.double_quant else ''} computing in {base}"
    ranks = f"r={cfg.rank}" if not cfg.ranks else f"ranks {','.join(map(str, sorted(set(cfg.ranks))))}"
    targets = ", ".join(shape.fm.config.resolved_targets)
    logits = f", {response} response tokens" if cfg.task == "sft" else ""
    return (f"{cfg.model}: {type(shape.fm.model).__name__}, {params / 1e9:.2f}B frozen parameters,"
            f" {dims['layers']} blocks; --task {cfg.task}, --strategy {cfg.strategy}, {base} base,"
            f" LoRA {ranks} on {targets} ({len(shape.layers)} layers), batch {cfg.batch_size} ×"
            f" {cfg.max_length} tokens{logits}, --device {cfg.device}")


def plan_one(cfg: JobConfig, args: argparse.Namespace) -> dict:
    """The whole plan of one model: printed, and returned for ``--json``."""
    shape = build_shape(cfg, args.num_labels)
    check_context(cfg.max_length, shape.text_config, None, shape.fm.model)  # as a job does (no tokenizer)
    response = args.response_tokens or default_response_tokens(cfg)
    mem = plan_memory(shape, cfg, response)
    clients = args.clients_per_pass or cfg.max_clients_per_pass or cfg.per_round()
    chosen = chosen_strategy(args)
    traffic = strategy_traffic(cfg, shape, [cfg.strategy] if chosen else None)
    picked = cfg.per_round()
    print(describe(cfg, shape, response), "\n")
    print("\n".join(memory_lines(mem, cfg, clients, args.memory)), "\n")
    others = "" if chosen else "; each strategy but --strategy with its default options"
    print(f"bytes per client per round, the largest over the round's {picked} of {cfg.num_clients} clients"
          f" (round 0: initialisation{others}):\n")
    print("\n".join(traffic_lines(traffic, cfg.rounds)))
    return {"model": cfg.model, "memory": asdict(mem), "per_client": mem.per_client,
            "fits": {label: mem.largest_pass(size) for label, size in args.memory},
            "traffic": {name: rows if isinstance(rows, str) else [asdict(r) for r in rows]
                        for name, rows in traffic.items()}}


def plan_table(cfg: JobConfig, args: argparse.Namespace, models: list[str]) -> list[dict]:
    """One line per model: its base, its memory per client with checkpointing off and on, and the
    clients a pass fits in each ``--memory`` (without / with checkpointing)."""
    response = args.response_tokens or default_response_tokens(cfg)
    shapes = {model: build_shape(replace(cfg, model=model), args.num_labels)  # every model read (and
              for model in models}                                              # refused) before a row
    fits = "".join(f" {label} |" for label, _ in args.memory)
    print(f"--task {cfg.task}, --quantize {cfg.quantize}, --precision {cfg.precision}, LoRA r={cfg.rank},"
          f" batch {cfg.batch_size} × {cfg.max_length} tokens"
          f"{f', {response} response tokens' if cfg.task == 'sft' else ''}, --device {cfg.device}"
          f"{'; clients per pass without / with --gradient-checkpointing' if args.memory else ''}\n")
    print(f"| model | parameters | base | per client | per client, checkpointing |{fits}")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(args.memory))
    out = []
    for model, shape in shapes.items():
        job = replace(cfg, model=model)
        off = plan_memory(shape, replace(job, gradient_checkpointing=False), response)
        on = plan_memory(shape, replace(job, gradient_checkpointing=True), response)
        ks = [(off.largest_pass(size), on.largest_pass(size)) for _, size in args.memory]
        params = sum(t.numel for t in shape.base)
        cells = [model, f"{params / 1e9:.2f}B", human(off.base), human(off.per_client), human(on.per_client),
                 *(f"{a} / {b}" for a, b in ks)]
        print("| " + " | ".join(cells) + " |")
        out.append({"model": model, "parameters": params, "base": off.base, "per_client": off.per_client,
                    "per_client_checkpointing": on.per_client,
                    "fits": {label: k for (label, _), k in zip(args.memory, ks, strict=True)}})
    return out


@command("fedlora-plan")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedlora-plan``."""
    args = parse_args(build_parser(), argv)  # --config FILE's fields, then the flags
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.model = models[0] if models else args.model
    cfg = check_args(args)
    result = plan_table(cfg, args, models) if len(models) > 1 else plan_one(cfg, args)
    if args.json is not None:
        args.json.write_text(json.dumps({"job": asdict(cfg), "plan": result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
