"""A frozen low-rank correction of a quantized base (``--quant-correction R``), LQER's form.

A quantized layer computes with ``Q = Q(W)`` (``d_out × d_in``), not with its checkpoint's
weight ``W``. Its error ``E = W − Q`` is close to full-rank noise, but the part of it that real
inputs see is low-rank: with ``S = diag(s)``, ``s_j`` the mean ``|x_j|`` of input channel j over
calibration tokens, the best rank-R fit of the error as the inputs weight it is

    E S ≈ P_R Σ_R Q_Rᵀ          (truncated SVD)
    U = P_R Σ_R                  (d_out × R)
    V = Q_Rᵀ S⁻¹                 (R × d_in)

and the corrected layer computes ``y = base(x) + x Vᵀ Uᵀ`` (:class:`CorrectedLinear`), ``U`` and
``V`` frozen in the adapter dtype. Without calibration inputs ``s = 1``: the plain SVD of ``E``.
Measured on SmolLM2-135M in NF4 (``benchmarks/quant_error.py``), rank 8 removed 20% of NF4's KL
from the unquantized model plainly and 73% weighted.

``Q`` is read by probing the layer with the identity (``base(I) − base(0)``: the weight the layer
really computes with, in its compute dtype, whatever the code), and ``W`` from the checkpoint's
safetensors files, one tensor at a time. Every party that builds the model from the same
checkpoint and calibration file gets the same factors, so the correction is part of the frozen
base: it never trains or travels, and the PEFT export carries it as LoRA factors (on the layers
the job adapts, beside the update; on the others, as their own) so that
``PeftModel.from_pretrained`` on the same quantized base is fedlora's model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from fedlora.errors import UserError
from fedlora.models.lora import adapter_dtype, compute_dtype, is_quantized
from fedlora.models.model import set_module

#: Calibration examples read from the start of the calibration file (every party reads the same).
CALIBRATION_ROWS = 32
#: Input channels whose mean ``|x|`` is below this share of the layer's largest are floored to it
#: (a channel no calibration token used still gets a finite ``1 / s``).
SCALE_FLOOR = 1e-4
#: The identity probe's rows per forward (bounds its memory to this many × ``d_in``).
PROBE_ROWS = 1024
#: The randomized SVD of a large error (:func:`top_singular`): extra directions and power iterations.
OVERSAMPLE, POWER_ITERS = 8, 8
#: The file beside an exported adapter that says it holds a correction (PEFT ignores it).
MARKER = "fedlora_correction.json"


class CorrectedLinear(nn.Module):
    """A quantized linear layer plus its frozen correction: ``y = base(x) + x Vᵀ Uᵀ``.

    Parameters
    ----------
    base : nn.Module
        The bitsandbytes layer (kept, not copied).
    U, V : Tensor
        ``(d_out, R)`` and ``(R, d_in)``, stored in the adapter dtype.
    """

    def __init__(self, base: nn.Module, U: Tensor, V: Tensor) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.compute_dtype = compute_dtype(base)
        dt = adapter_dtype(self.compute_dtype)
        dev = base.weight.device
        self.register_buffer("corr_U", U.to(dev, dt).contiguous())
        self.register_buffer("corr_V", V.to(dev, dt).contiguous())

    @property
    def weight(self) -> Tensor:
        """The base layer's (packed) weight, as a linear layer has one (its device, for callers)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def frozen_term(self, x: Tensor) -> Tensor:
        """``x Vᵀ Uᵀ`` in the adapter dtype (an adapted layer adds it to its own terms, then rounds
        their sum to the compute dtype once, as a PEFT adapter holding the correction does)."""
        return (x.to(self.corr_V.dtype) @ self.corr_V.T) @ self.corr_U.T   # (…, R) -> (…, d_out)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)                                            # (…, d_out), quantized GEMM
        return y + self.frozen_term(x).to(y.dtype)


@torch.no_grad()
def computed_weight(module: nn.Module) -> Tensor:
    """``(d_out, d_in)`` float32: the weight ``module`` computes with, read as ``module(I) − module(0)``."""
    d_in, dev = module.in_features, module.weight.device
    dt = compute_dtype(module)
    zero = module(torch.zeros(1, d_in, device=dev, dtype=dt)).float()
    cols = []
    for start in range(0, d_in, PROBE_ROWS):
        eye = torch.zeros(min(PROBE_ROWS, d_in - start), d_in, device=dev, dtype=dt)
        eye[:, start:start + eye.shape[0]].fill_diagonal_(1)
        cols.append(module(eye).float() - zero)                    # (rows, d_out): columns of Wᵀ
    return torch.cat(cols).T.contiguous()


def top_singular(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(P (m, r), σ (r,), Qᵀ (r, n))``: the top ``r = min(rank, m, n)`` singular triplets of ``M``.

    A small matrix (or a rank near its size) gets the exact SVD in float64; a large one the
    randomized one (``torch.svd_lowrank``: :data:`OVERSAMPLE` extra directions, :data:`POWER_ITERS`
    power iterations, seeded, so every party computes the same), on ``M``'s device. A test holds its
    residual within 1% of the exact SVD's; a one-off check on SmolLM2's weighted NF4 errors at rank 8
    found it within 0.1% (its time is not measured by a benchmark).
    """
    r = min(rank, *M.shape)
    if min(M.shape) <= 2 * (r + OVERSAMPLE):
        P, sig, Qh = torch.linalg.svd(M.double(), full_matrices=False)
        return P[:, :r], sig[:r], Qh[:r]
    with torch.random.fork_rng(devices=[M.device] if M.device.type == "cuda" else []):
        torch.manual_seed(0)
        P, sig, Q = torch.svd_lowrank(M.float(), q=r + OVERSAMPLE, niter=POWER_ITERS)
    return P[:, :r], sig[:r], Q[:, :r].T


def correction_factors(error: Tensor, rank: int, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(U (d_out, R), V (R, d_in))`` float32 minimising ``‖(E − U V) S‖_F`` (``S = diag(scale)``, or I)
    over rank ``R = min(rank, d_out, d_in)`` (:func:`top_singular`)."""
    s = torch.ones(error.shape[1]) if scale is None else scale.float()
    s = s.to(error.device).clamp_min(SCALE_FLOOR * float(s.max()) if float(s.max()) > 0 else 1.0)
    P, sig, Qh = top_singular(error.float() * s, rank)
    return (P * sig).float().contiguous(), (Qh / s).float().contiguous()


class Checkpoint:
    """The unquantized weights of a model folder's safetensors files, read one tensor at a time."""

    def __init__(self, path: Path) -> None:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise UserError(f"--quant-correction reads the unquantized weights from the model's"
                            f" .safetensors files, and {str(path)!r} has none: convert the checkpoint"
                            " (save_pretrained) or drop --quant-correction")
        self.path = Path(path)
        self.where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as fh:
                self.where.update(dict.fromkeys(fh.keys(), file))

    def weight(self, module_name: str) -> Tensor:
        """The float32 weight of the layer ``module_name`` (its key, or the one key that ends with
        the name less leading parts: a classification model's names over a causal LM's file)."""
        parts = module_name.split(".")
        for i in range(len(parts)):
            key = ".".join(parts[i:]) + ".weight"
            hits = [k for k in self.where if k == key or k.endswith("." + key)] if i else \
                ([key] if key in self.where else [])
            if len(hits) == 1:
                with safe_open(str(self.where[hits[0]]), framework="pt") as fh:
                    return fh.get_tensor(hits[0]).float()
        raise UserError(f"--quant-correction: no unquantized weight for {module_name} in"
                        f" {str(self.path)!r}'s safetensors files: drop --quant-correction")


def conv1d_layers(model: nn.Module) -> set[str]:
    """Names of the layers that ``model``'s class builds as transformers' ``Conv1D`` (GPT-2), whose
    checkpoint weights are stored ``d_in × d_out``, read from a weightless twin on the meta device
    (bitsandbytes has replaced them by ``Linear4bit`` / ``Linear8bitLt`` in ``model``)."""
    with torch.device("meta"):
        twin = type(model)(model.config)
    return {name for name, m in twin.named_modules() if isinstance(m, Conv1D)}


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every bitsandbytes layer of ``model`` (inside an adapter: ``….base``), in order."""
    return {name: m for name, m in model.named_modules() if is_quantized(m)}


@torch.no_grad()
def input_scales(fm, layers: dict[str, nn.Module], batches: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Mean ``|x|`` per input channel of each of ``layers`` over the non-padding tokens of
    ``batches`` (``input_ids``, ``attention_mask``), run through ``fm``'s slot 0; over every row of
    a layer that sees one row per sequence (a BERT pooler's first token)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    keep: list[Tensor] = []

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])    # (B·T, d_in), or (B, d_in)
            if x.shape[0] == keep[0].shape[0]:
                x = x[keep[0]]                                          # the tokens, not the pads
            sums[name] = sums.get(name, 0) + x.float().abs().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for batch in batches:
            keep[:] = [batch["attention_mask"].reshape(-1).bool()]
            fm(**batch)
    finally:
        for h in handles:
            h.remove()
    return {n: s / max(counts[n], 1) for n, s in sums.items()}


def calibration_batches(data: dict[str, Tensor] | None, batch: int = 8) -> list[dict[str, Tensor]]:
    """The first :data:`CALIBRATION_ROWS` encoded examples (a pair's two rows as two) in batches of
    ``batch``: ``input_ids`` and ``attention_mask`` only; none without data."""
    if data is None:
        return []
    ids, mask = (data[k].reshape(-1, data[k].shape[-1])[:CALIBRATION_ROWS]   # (rows, T)
                 for k in ("input_ids", "attention_mask"))
    return [{"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch]}
            for i in range(0, ids.shape[0], batch)]


def add_correction(fm, path: Path, rank: int, batches: list[dict[str, Tensor]],
                   note: dict | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Put a rank-``rank`` correction beside every quantized layer of ``fm`` (checkpoint ``path``),
    weighted by ``batches``' input scales (none: the plain SVD). Returns layer -> ``(A, B)`` (the
    model's layer names, an adapted layer's without ``.base``), kept as ``fm.correction``, and
    ``note`` (what it is) as ``fm.correction_note``."""
    layers = quantized_layers(fm.model)
    if not layers:
        raise UserError("--quant-correction: the model has no quantized layer: pass --quantize nf4")
    dev = next(iter(layers.values())).weight.device
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    scales = input_scales(fm, layers, batches) if batches else {}
    ckpt, transposed = Checkpoint(path), conv1d_layers(fm.model)
    out = {}
    for name, module in layers.items():
        owner = name.removesuffix(".base")
        weight = ckpt.weight(owner)
        error = (weight.T if owner in transposed else weight).to(dev) - computed_weight(module)
        U, V = correction_factors(error, rank, scales.get(name))
        set_module(fm.model, name, CorrectedLinear(module, U, V))
        out[owner] = (V.cpu(), U.cpu())
    fm.correction, fm.correction_note = out, note
    return out


def read_marker(folder: Path) -> dict | None:
    """The correction an exported adapter in ``folder`` holds (its :data:`MARKER`), or None."""
    f = Path(folder) / MARKER
    return json.loads(f.read_text()) if f.is_file() else None
