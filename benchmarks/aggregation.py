"""Server-side aggregation time of each registered strategy for one round.

Times ``strategy.aggregate(uploads, state)`` alone: the pure torch function the
coordinator calls once per round (no Flower, no model, no wire decoding). The default
job is the issue's target size: 100 clients, square ``d × d`` adapted matrices with
d = 4096, rank r = 64, 32 adapted matrices (a 7B-class model's attention q/v in 16
layers); the goal is ≤ 1 s per round on a GPU for every strategy.

Uploads are random tensors of the right shapes (timings do not depend on the values:
every strategy runs a fixed sequence of dense operations), built once and shared by
the LoRA strategies. Global states are built directly:

* fedavg, lora-fair: ``(A random, B = 0)`` as ``fedlora.models.state.initial_state`` builds it
  (neither strategy reads it beyond ``merged``, which is empty);
* flora (``--flora-round later``, the default): ``merged`` holds an earlier fold of
  rank ``min(d, K·r)``, so a round stacks, concatenates and, when the summed rank
  exceeds d, re-factors exactly by QR (``compact``) as every round from the third on
  does; ``--flora-round first`` times round 1 (nothing merged yet);
* fed-sb: shared frozen ``A``, ``B`` with orthonormal rows/columns and random cores
  ``R_k``; its dense gradient initialisation (``--strategy-options init=dense``, a
  one-off round, not part of the per-round time) gets its own line, timed with the K
  clients' ``d × d`` gradients sharing one tensor per layer (same arithmetic as K
  distinct ones, memory of one client; the time includes forming each client's
  answer, which a client does).

Every ``aggregate`` also computes ``agg_error`` (in float64, factored); the column
"w/o agg_error" re-times it with that diagnostic stubbed out (the strategy module's
``ideal_factors``/``relative_error`` replaced) to show what the error costs. A strategy
whose estimated peak memory exceeds what is available (``--max-gib`` caps it) is
skipped with a message, as is one that raises.

Usage::

    python benchmarks/aggregation.py --small                       # seconds, on CPU
    python benchmarks/aggregation.py                               # the full job (GPU)
    python benchmarks/aggregation.py --layers 1 --warmup 0 --repeat 1 --max-gib 12
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Iterator

import torch

from fedlora.strategies import ClientUpload, GlobalState, Strategy, get_strategy
from fedlora.strategies.fed_sb import initialize_from_gradients
from fedlora.strategies.registry import STRATEGIES

GIB = 2 ** 30
F32, F64 = 4, 8
BASELINE = GIB // 2        # the interpreter, torch and allocator slack, added to every estimate


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    return name


def available_bytes(device: str) -> int:
    """Free memory where the tensors live: GPU memory, or the host's available RAM.

    Parameters
    ----------
    device : str
        ``cpu`` or a CUDA device.

    Returns
    -------
    int
        Bytes; ``torch.cuda.mem_get_info`` on a GPU, else psutil's ``available`` or
        ``MemAvailable`` from ``/proc/meminfo``.
    """
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        import psutil
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("cannot read the available memory (no psutil, no /proc/meminfo)") from None
    return int(psutil.virtual_memory().available)


def error_bytes(d: int, agg_rank: int, ideal_rank: int, k: int, r: int) -> int:
    """Transient peak of one layer's ``relative_error`` numerator (float64, factored).

    The concatenated ``U (d, R)``, ``V (R, d)`` in float64, the negated ideal factors, and
    the three ``R × R`` matrices of ``tr((UᵀU)(VVᵀ))``, with ``R = agg_rank + ideal_rank``.
    """
    rr = agg_rank + ideal_rank
    return 2 * d * rr * F64 + k * d * r * F32 + 3 * rr * rr * F64


def estimate_bytes(name: str, args: argparse.Namespace) -> int:
    """Estimated peak memory of building the inputs and running one ``aggregate``.

    Parameters
    ----------
    name : str
        Registered strategy name.
    args : argparse.Namespace
        ``clients``, ``dim``, ``rank``, ``layers``, ``flora_round``.

    Returns
    -------
    int
        Bytes: uploads, global state, what the strategy holds until the end (the
        ideal update's scaled factors, FLoRA's fold and merged factors) plus the largest
        per-layer transients (error computation, FLoRA's QR compaction).
    """
    k, d, r, n = args.clients, args.dim, args.rank, args.layers
    ideal = k * n * d * r * F32                       # p_k s_k B_k (or B R_k) per client and layer
    state = n * 2 * d * r * F32
    if name == "fed-sb":
        return k * n * r * r * F32 + state + ideal + error_bytes(d, r, k * r, k, r)
    uploads = k * n * 2 * d * r * F32
    if name != "flora":
        extra = n * d * r * F32 + 2 * d * r * F64 * 2 if name == "lora-fair" else 0
        return uploads + state + ideal + extra + error_bytes(d, r, k * r, k, r)
    stacked = k * r
    m = min(d, stacked) if args.flora_round == "later" else 0
    fold = n * 2 * d * stacked * F32
    merged_in = n * 2 * d * m * F32
    merged_out = n * 2 * d * min(m + stacked, d) * F32 if m else 0
    compact = (2 * d * (m + stacked) * F32 + 3 * d * (m + stacked) * F64 + 2 * d * d * F64) if m else 0
    return uploads + ideal + fold + merged_in + merged_out + compact + error_bytes(d, stacked, stacked, k, r)


def init_bytes(args: argparse.Namespace) -> int:
    """Estimated peak memory of timing Fed-SB's ``initialize`` (one gradient per layer)."""
    d, n = args.dim, args.layers
    return n * d * d * F32 + 3 * d * d * F32 + 3 * d * d * F64 + n * 2 * d * args.rank * F32


def _counts(k: int, gen: torch.Generator) -> list[int]:
    return torch.randint(50, 500, (k,), generator=gen, device=gen.device).tolist()


def layer_names(n: int) -> list[str]:
    """``n`` adapted-matrix names in the q/v-per-block pattern of a decoder."""
    return [f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj" for i in range(n)]


def lora_uploads(args: argparse.Namespace, device: str, gen: torch.Generator) -> list[ClientUpload]:
    """K LoRA uploads: ``A_k (r, d)``, ``B_k (d, r)`` per layer, scale ``α / r`` with α = 16."""
    d, r = args.dim, args.rank
    counts = _counts(args.clients, gen)
    uploads = []
    for n_k in counts:
        factors = {name: (torch.randn(r, d, generator=gen, device=device) / math.sqrt(d),
                          torch.randn(d, r, generator=gen, device=device) * 1e-2)
                   for name in layer_names(args.layers)}
        uploads.append(ClientUpload(num_examples=n_k, factors=factors, scale=16.0 / r))
    return uploads


def frozen_a(uploads: list[ClientUpload], state: GlobalState) -> list[ClientUpload]:
    """The uploads of a round in which A stays frozen (FFA-LoRA, RoLoRA's B rounds): A_k = Ā."""
    return [ClientUpload(num_examples=u.num_examples, scale=u.scale,
                         factors={n: (state.factors[n][0], B) for n, (_, B) in u.factors.items()})
            for u in uploads]


def orthonormal(rows: int, cols: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """A ``rows × cols`` matrix with orthonormal columns (rows ≥ cols) from a QR of noise."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, device=device))
    return q.contiguous()


def lora_state(name: str, args: argparse.Namespace, device: str, gen: torch.Generator) -> GlobalState:
    """The global state a LoRA strategy aggregates against (see the module docstring)."""
    d, r, names = args.dim, args.rank, layer_names(args.layers)
    if name != "flora":
        factors = {n: (torch.randn(r, d, generator=gen, device=device) / math.sqrt(d),
                       torch.zeros(d, r, device=device)) for n in names}
        return GlobalState(factors=factors, scale=16.0 / r)
    if args.flora_round == "first":
        return GlobalState(factors=None)
    m = min(d, args.clients * r)
    merged = {n: (torch.randn(m, d, generator=gen, device=device) * 1e-2 / math.sqrt(d),
                  torch.randn(d, m, generator=gen, device=device) / math.sqrt(d)) for n in names}
    return GlobalState(factors=None, merged=merged)


def sb_round(args: argparse.Namespace, device: str,
             gen: torch.Generator) -> tuple[list[ClientUpload], GlobalState]:
    """Fed-SB uploads (``R_k``, ``r × r``) and a state with shared orthonormal ``A``, ``B``."""
    d, r, names = args.dim, args.rank, layer_names(args.layers)
    factors = {n: (orthonormal(d, r, device, gen).T.contiguous(), orthonormal(d, r, device, gen))
               for n in names}
    cores = {n: torch.randn(r, r, generator=gen, device=device) for n in names}
    state = GlobalState(factors=factors, scale=16.0 / r, cores=cores)
    uploads = [ClientUpload(num_examples=n_k,
                            cores={n: cores[n] + 1e-2 * torch.randn(r, r, generator=gen, device=device)
                                   for n in names})
               for n_k in _counts(args.clients, gen)]
    return uploads, state


@contextlib.contextmanager
def without_error(strategy: Strategy) -> Iterator[None]:
    """Stub the strategy module's ``ideal_factors``/``relative_error`` (agg_error becomes 0).

    A strategy that computes no ``agg_error`` (FedSA-LoRA) imports neither: nothing to stub.
    """
    module = sys.modules[type(strategy).__module__]
    stubs = {"ideal_factors": lambda *a, **kw: ([], []), "relative_error": lambda parts: 0.0}
    saved = {name: getattr(module, name) for name in stubs if hasattr(module, name)}
    for name in saved:
        setattr(module, name, stubs[name])
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def timed(fn, args: argparse.Namespace, device: str) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``args.repeat`` calls after ``args.warmup`` calls."""
    for _ in range(args.warmup):
        fn()
    _sync(device)
    times, out = [], None
    for _ in range(args.repeat):
        out = None                     # free the previous result before the next call
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_strategy(name: str, uploads: list[ClientUpload], state: GlobalState,
                 args: argparse.Namespace, device: str) -> str:
    """One result line: median seconds, seconds without agg_error, the agg_error value."""
    strategy = get_strategy(name)
    label = f"{name} ({'round 1' if args.flora_round == 'first' else 'later'})" if name == "flora" else name
    try:
        seconds, agg = timed(lambda: strategy.aggregate(uploads, state), args, device)
        error = agg.agg_error
        del agg
        bare = "-"
        if args.split:
            with without_error(strategy):
                bare = f"{timed(lambda: strategy.aggregate(uploads, state), args, device)[0]:.3f}"
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"{label:<16} failed: {type(e).__name__}: {first}"
    computed = "yes" if isinstance(error, float) and math.isfinite(error) else "no"
    error = float("nan") if error is None else error
    verdict = "ok" if seconds <= 1.0 else "over 1 s"
    return (f"{label:<16} {seconds:>10.3f} {bare:>14} {computed:>9} {error:>10.2e}"
            f" {(estimate_bytes(name, args) + BASELINE) / GIB:>8.2f} {verdict:>9}")


def run_init(args: argparse.Namespace, device: str, gen: torch.Generator) -> str:
    """Fed-SB's one-off ``initialize`` with K clients whose gradients share one tensor per layer."""
    d, names = args.dim, layer_names(args.layers)
    grads = {n: torch.randn(d, d, generator=gen, device=device) for n in names}
    uploads = [ClientUpload(num_examples=n_k, grads=grads) for n_k in _counts(args.clients, gen)]
    strategy = get_strategy("fed-sb", init="dense")
    try:
        seconds, _ = timed(lambda: initialize_from_gradients(strategy, uploads, args.rank, 16.0 / args.rank),
                           args, device)
    except (RuntimeError, ValueError) as e:
        return f"{'fed-sb init':<16} failed: {type(e).__name__}: {str(e).splitlines()[0]}"
    return (f"{'fed-sb init':<16} {seconds:>10.3f} {'-':>14} {'-':>9} {'-':>10}"
            f" {(init_bytes(args) + BASELINE) / GIB:>8.2f}  one-off round, not per-round")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--small`` overrides the sizes with a seconds-long CPU job."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--dim", type=int, default=4096, help="d_out = d_in of every adapted matrix")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--layers", type=int, default=32, help="adapted matrices")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--repeat", type=int, default=3, help="timed calls (the median is printed)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated, from {', '.join(STRATEGIES)}")
    p.add_argument("--skip", default="", help="comma-separated strategies left out of --strategies")
    p.add_argument("--flora-round", choices=["first", "later"], default="later",
                   help="FLoRA: round 1 (nothing merged) or a later round (merged rank min(d, K·r))")
    p.add_argument("--no-split", dest="split", action="store_false",
                   help="skip the re-timing without the agg_error diagnostic")
    p.add_argument("--skip-init", action="store_true", help="do not time Fed-SB's initialisation round")
    p.add_argument("--max-gib", type=float, default=None, help="cap on the memory a run may use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--small", action="store_true", help="clients 10, dim 512, rank 16, layers 4")
    args = p.parse_args(argv)
    if args.small:
        args.clients, args.dim, args.rank, args.layers = 10, 512, 16, 4
    skip = [s for s in args.skip.split(",") if s]
    unknown = [s for s in args.strategies.split(",") + skip if s not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    args.strategies = ",".join(s for s in args.strategies.split(",") if s not in skip)
    if args.repeat < 1 or args.warmup < 0:
        p.error("--repeat must be ≥ 1 and --warmup ≥ 0")
    return args


def plan(names: list[str], args: argparse.Namespace, budget: int) -> tuple[list[str], list[str]]:
    """Split ``names`` into those whose estimate fits ``budget`` and skip lines for the rest."""
    run, skipped = [], []
    for name in names:
        need = estimate_bytes(name, args) + BASELINE
        if need > budget:
            skipped.append(f"{name:<16} skipped: needs ~{need / GIB:.1f} GiB, {budget / GIB:.1f} GiB"
                           f" budget; try fewer --layers or --clients")
        else:
            run.append(name)
    return run, skipped


def main(argv: list[str] | None = None) -> None:
    """Print the header, then one line per strategy (and Fed-SB's initialisation)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    budget = int(0.9 * available_bytes(device))
    if args.max_gib is not None:
        budget = min(budget, int(args.max_gib * GIB))
    names = args.strategies.split(",")
    uploads_gib = args.clients * args.layers * 2 * args.dim * args.rank * F32 / GIB
    print(f"job: {args.clients} clients, d_out = d_in = {args.dim}, r = {args.rank}, {args.layers} adapted"
          f" matrices (LoRA uploads {uploads_gib:.3g} GiB float32), device {device}, torch"
          f" {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeat} after"
          f" {args.warmup} warm-up, memory budget {budget / GIB:.1f} GiB")
    print(f"{'strategy':<16} {'s/round':>10} {'w/o agg_error':>14} {'agg_error':>9} {'value':>10}"
          f" {'est. GiB':>8} {'vs 1 s':>9}")
    run, skipped = plan(names, args, budget)
    for line in skipped:
        print(line, flush=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    lora = [n for n in run if "R" not in STRATEGIES[n].adapter_plan.factors]  # A, B travel
    if lora:
        uploads = lora_uploads(args, device, gen)
        for name in lora:
            state = lora_state(name, args, device, gen)
            ups = uploads if "A" in get_strategy(name).plan(1).train else frozen_a(uploads, state)
            print(run_strategy(name, ups, state, args, device), flush=True)
        del uploads
    if "fed-sb" in run:
        print(run_strategy("fed-sb", *sb_round(args, device, gen), args, device), flush=True)
    if "fed-sb" in names and not args.skip_init:
        if init_bytes(args) + BASELINE > budget:
            print(f"{'fed-sb init':<16} skipped: needs ~{(init_bytes(args) + BASELINE) / GIB:.1f} GiB",
                  flush=True)
        else:
            print(run_init(args, device, gen), flush=True)


if __name__ == "__main__":
    main()
