"""Compressed updates (``--compress``, ``--compress-down``): the schemes, and one message's coding.

A scheme turns one float32 tensor ``x`` (``n`` entries, flattened in C order) into a payload of two
parts, a *main* tensor and an optional 1-D *side* tensor, and back:

* ``none``: ``x`` itself (float32, 4 bytes an entry).
* ``fp16`` / ``bf16``: ``x`` cast to float16 / bfloat16 (2 bytes an entry; bfloat16 travels as its
  int16 bit pattern, which ``.npy`` can hold). Relative error ≤ 2⁻¹¹ / 2⁻⁸ per entry.
* ``int8``: blockwise absmax. ``x`` is cut into blocks of :data:`BLOCK` = 64 entries (the last one
  shorter); block ``b`` has the scale ``s_b = ⌈max_i |x_i| / 127⌉₁₆`` (rounded *up* to a float16,
  which is what travels) and codes ``q_i = round(x_i / s_b) ∈ [−127, 127]`` (int8, the tensor's
  shape). Decoded ``x̂_i = q_i s_b``, so ``|x_i − x̂_i| ≤ s_b / 2``. Bytes: ``n + 2⌈n/64⌉``.
* ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of
  Quantized LLMs", Appendix E; the values of bitsandbytes' ``create_normal_map``): the 16 values
  :data:`NF4` (quantiles of N(0, 1) scaled to [−1, 1], with an exact 0). Blocks of 64 with the
  float16 absmax ``s_b = ⌈max_i |x_i|⌉₁₆``; ``c_i`` = the index of the code nearest ``x_i / s_b``,
  two codes packed per byte (uint8, low nibble first); ``x̂_i = NF4[c_i] s_b``. Bytes:
  ``⌈n/2⌉ + 2⌈n/64⌉``.
* ``topk:F`` (0 < F ≤ 1): the ``k = ⌈F n⌉`` entries of largest ``|x_i|`` (ties by lower index),
  as their flat indices (int16 when ``n ≤ 2¹⁵``, else int32) and float32 values; every other
  entry decodes to 0. Bytes: ``k (2 or 4) + 4k``.

The int8 and nf4 codings are *idempotent*: re-encoding a decoded tensor gives the same codes and
scales (its largest entry is ``±127 s_b`` or ``±s_b`` exactly), so a server that keeps its global
state at the shipped precision (``--compress-down``) ships exactly what it holds.

**A message** (:func:`pack`) of named tensors holds each tensor's main part under the tensor's
name, every side part concatenated in name order under :data:`SIDE`, and the shapes under
:data:`SHAPES` (int32: ``ndim, dims…`` per tensor in name order), so :func:`unpack` needs nothing
else; with ``none`` the message is the tensors themselves. Its bytes are counted as shipped
(:func:`fedlora.rounds.wire.tensor_bytes` of the message).

**Uploads** (:class:`Codec`) code ``x = θ − ref + e``: ``θ`` the tensor the strategy's upload
formed, ``ref`` the value of the same name in the global state the client started from when both
sides hold it (the download: ``fedlora.models.state.download_tensors`` with ``first=True``; 0 for a
tensor the server never sent, like FLoRA's fresh factors) and ``e`` the client's error-feedback
residual. The server decodes ``θ̂ = ref + x̂``; the client keeps ``e ← x − x̂`` for its next round
(lossy schemes, unless ``--no-error-feedback``; not for FLoRA and FlexLoRA, whose clients start every
round from fresh factors). ``compress_error`` is ``‖θ̂ − θ‖ / ‖θ‖`` over the
round's uploaded tensors.

**One-shot uploads** (:meth:`Codec.encode_once`: Fed-SB's initialisation sketches ``Lᵀ G_k R``, or
its dense gradients) have no value both sides hold and are sent once, so they code ``x = θ``
(``ref = 0``) with no residual; the server decodes ``θ̂ = x̂``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.errors import UserError

BLOCK = 64
"""Entries per int8 / nf4 block (one float16 scale each)."""

SIDE = "compress.side"
SHAPES = "compress.shapes"

# QLoRA's NF4 code book (Dettmers et al. 2023, Appendix E; bitsandbytes.functional.create_normal_map):
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


@dataclass(frozen=True)
class Payload:
    """One tensor's coded form: ``main`` (shipped under the tensor's name) and ``side`` (or None)."""

    main: Tensor
    side: Tensor | None = None


class Scheme:
    """A coding of one float32 tensor (see the module docstring). Subclasses set ``name`` and
    ``lossy`` and implement :meth:`encode`, :meth:`decode` and :meth:`side_len`."""

    name = ""
    lossy = True
    idempotent = True  # decode(encode(decode(encode(x)))) == decode(encode(x)), bit for bit

    def encode(self, x: Tensor) -> Payload:
        raise NotImplementedError

    def decode(self, p: Payload, shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def side_len(self, n: int) -> int:
        """Entries of the side part of an ``n``-entry tensor."""
        return 0

    def nbytes(self, p: Payload) -> int:
        """The payload's raw bytes (main and side, without framing)."""
        side = 0 if p.side is None else p.side.numel() * p.side.element_size()
        return p.main.numel() * p.main.element_size() + side

    def __str__(self) -> str:
        return self.name


class Identity(Scheme):
    name, lossy = "none", False

    def encode(self, x: Tensor) -> Payload:
        return Payload(x)

    def decode(self, p: Payload, shape: tuple[int, ...]) -> Tensor:
        return p.main.float().reshape(shape)


class Cast(Scheme):
    """``fp16`` / ``bf16``: a cast (bfloat16 as its int16 bits)."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype

    def encode(self, x: Tensor) -> Payload:
        y = x.float().to(self.dtype)
        return Payload(y.view(torch.int16) if self.dtype == torch.bfloat16 else y)

    def decode(self, p: Payload, shape: tuple[int, ...]) -> Tensor:
        m = p.main.view(torch.bfloat16) if self.dtype == torch.bfloat16 else p.main
        return m.float().reshape(shape)


def _blocks(x: Tensor) -> tuple[Tensor, int]:
    """``x`` flattened and zero-padded to whole blocks, shaped ``(blocks, BLOCK)``; and ``n``."""
    flat = x.detach().float().reshape(-1)
    n = flat.numel()
    pad = -n % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, BLOCK), n


def _scales(absmax: Tensor, top: float) -> Tensor:
    """``absmax / top`` rounded up to float16 values (returned as float32)."""
    s = absmax / top
    s16 = s.half().float()
    up = torch.nextafter(s.half(), torch.full_like(s, float("inf"), dtype=torch.float16)).float()
    return torch.where(s16 < s, up, s16)


class Int8(Scheme):
    name = "int8"

    def encode(self, x: Tensor) -> Payload:
        b, n = _blocks(x)
        s = _scales(b.abs().amax(dim=1), 127.0)
        q = torch.round(b / torch.where(s > 0, s, 1.0)[:, None]).clamp(-127, 127)
        return Payload(q.reshape(-1)[:n].to(torch.int8).reshape(x.shape), s.half())

    def decode(self, p: Payload, shape: tuple[int, ...]) -> Tensor:
        n = math.prod(shape)
        q = torch.nn.functional.pad(p.main.reshape(-1).float(), (0, -n % BLOCK)).reshape(-1, BLOCK)
        return (q * p.side.float()[:, None]).reshape(-1)[:n].reshape(shape)

    def side_len(self, n: int) -> int:
        return -(-n // BLOCK)


class NF4Scheme(Int8):
    name = "nf4"

    def encode(self, x: Tensor) -> Payload:
        b, n = _blocks(x)
        s = _scales(b.abs().amax(dim=1), 1.0)
        y = b / torch.where(s > 0, s, 1.0)[:, None]
        c = (y.reshape(-1, 1) - NF4.to(y.device)).abs().argmin(dim=1)[:n].to(torch.uint8)
        if n % 2:
            c = torch.cat([c, c.new_zeros(1)])
        return Payload(c[0::2] | (c[1::2] << 4), s.half())

    def decode(self, p: Payload, shape: tuple[int, ...]) -> Tensor:
        n = math.prod(shape)
        packed = p.main.reshape(-1).to(torch.uint8)
        c = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n].long()
        v = torch.nn.functional.pad(NF4.to(c.device)[c], (0, -n % BLOCK)).reshape(-1, BLOCK)
        return (v * p.side.float()[:, None]).reshape(-1)[:n].reshape(shape)


class TopK(Scheme):
    """``topk:F``: the ``⌈F n⌉`` largest-magnitude entries and their flat indices."""

    idempotent = False  # sparse: a global state cannot travel this way (--compress-down)

    def __init__(self, fraction: float) -> None:
        self.fraction, self.name = fraction, f"topk:{fraction:g}"

    def k(self, n: int) -> int:
        return min(n, max(1, math.ceil(round(self.fraction * n, 9)))) if n else 0

    def encode(self, x: Tensor) -> Payload:
        flat = x.detach().float().reshape(-1)
        n = flat.numel()
        idx = torch.sort(torch.argsort(flat.abs(), descending=True, stable=True)[:self.k(n)]).values
        return Payload(idx.to(torch.int16 if n <= 2 ** 15 else torch.int32), flat[idx].clone())

    def decode(self, p: Payload, shape: tuple[int, ...]) -> Tensor:
        n = math.prod(shape)
        idx = p.main.reshape(-1).long()
        if idx.numel() != self.k(n) or p.side.numel() != idx.numel() or (
                idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n)):
            raise ValueError(f"top-k payload does not fit a tensor of shape {tuple(shape)}")
        out = torch.zeros(n, device=p.side.device)
        out[idx] = p.side.float()
        return out.reshape(shape)

    def side_len(self, n: int) -> int:
        return self.k(n)


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Identity(), Cast("fp16", torch.float16), Cast("bf16", torch.bfloat16), Int8(), NF4Scheme())}
"""Registry of the parameter-free schemes by name; ``topk:F`` is built by :func:`parse_scheme`."""

CHOICES = "none, fp16, bf16, int8, nf4 or topk:F with 0 < F ≤ 1"


def parse_scheme(text: str, flag: str = "--compress") -> Scheme:
    """The scheme named ``text`` (``int8``, ``topk:0.1``, ...); a :class:`UserError` otherwise."""
    name, sep, arg = (text or "none").strip().partition(":")
    if name == "topk":
        try:
            f = float(arg)
        except ValueError:
            f = float("nan")
        if not 0 < f <= 1:
            raise UserError(f"{flag} topk:F needs a share F in (0, 1], got {text!r} (e.g. topk:0.1)")
        return TopK(f)
    if name not in SCHEMES or sep:
        raise UserError(f"{flag}: unknown scheme {text!r}; choose {CHOICES}")
    return SCHEMES[name]


def round_trip(scheme: Scheme, x: Tensor) -> Tensor:
    """``decode(encode(x))``: what the receiver of ``x`` holds."""
    return scheme.decode(scheme.encode(x), tuple(x.shape))


def pack(scheme: Scheme, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The message that ships ``tensors`` under ``scheme`` (see the module docstring)."""
    if isinstance(scheme, Identity) or not tensors:
        return dict(tensors)
    out, sides, shapes = {}, [], []
    for name in sorted(tensors):
        t = tensors[name]
        p = scheme.encode(t)
        out[name] = p.main
        if p.side is not None:
            sides.append(p.side.reshape(-1))
        shapes += [t.dim(), *t.shape]
    if sides:
        out[SIDE] = torch.cat(sides)
    out[SHAPES] = torch.tensor(shapes, dtype=torch.int32)
    return out


def unpack(scheme: Scheme, message: dict[str, Tensor],
           expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
    """The float32 tensors of a :func:`pack` message. ``expected`` (name -> shape, from the receiver's
    own model) replaces the message's shapes, which must then agree. Raises ``ValueError`` for a
    message that does not decode."""
    if isinstance(scheme, Identity) or not message:
        return dict(message)
    names = sorted(k for k in message if k not in (SIDE, SHAPES))
    if SHAPES not in message:
        raise ValueError(f"a {scheme} message needs its '{SHAPES}'")
    dims, shapes, i = message[SHAPES].tolist(), {}, 0
    for name in names:
        if i >= len(dims) or i + 1 + int(dims[i]) > len(dims):
            raise ValueError(f"'{SHAPES}' is too short for {name!r}")
        shapes[name], i = tuple(int(d) for d in dims[i + 1:i + 1 + int(dims[i])]), i + 1 + int(dims[i])
        if expected is not None and expected.get(name, shapes[name]) != shapes[name]:
            raise ValueError(f"{name} has shape {shapes[name]}, expected {expected[name]}")
    side = message.get(SIDE, torch.zeros(0))
    out, at = {}, 0
    for name in names:
        k = scheme.side_len(math.prod(shapes[name]))
        if at + k > side.numel():
            raise ValueError(f"'{SIDE}' is too short for {name!r}")
        try:
            out[name] = scheme.decode(Payload(message[name], side[at:at + k] if k else None), shapes[name])
        except RuntimeError as exc:
            raise ValueError(f"{name} does not decode as {scheme}: {exc}") from None
        at += k
    return out


class Codec:
    """One upload's coding with error feedback (see the module docstring).

    Parameters
    ----------
    scheme : Scheme
        The upload's scheme.
    feedback : bool
        Keep the residual ``e`` (lossy schemes; ``--no-error-feedback`` turns it off).
    """

    def __init__(self, scheme: Scheme, feedback: bool = True) -> None:
        self.scheme, self.feedback = scheme, feedback and scheme.lossy

    @property
    def on(self) -> bool:
        return not isinstance(self.scheme, Identity)

    @staticmethod
    def reference(name: str, t: Tensor, ref: dict[str, Tensor]) -> Tensor:
        """``ref[name]`` when it is there with ``t``'s shape, else zeros."""
        r = ref.get(name)
        return r.float() if r is not None and tuple(r.shape) == tuple(t.shape) else torch.zeros_like(t)

    def encode(self, upload: dict[str, Tensor], ref: dict[str, Tensor], residual: dict[str, Tensor]
               ) -> tuple[dict[str, Tensor], dict[str, Tensor], tuple[float, float]]:
        """``(message, new residual, (‖θ̂ − θ‖², ‖θ‖²))`` for the client's ``upload`` (θ)."""
        if not self.on:
            return dict(upload), {}, (0.0, sum(float(t.float().pow(2).sum()) for t in upload.values()))
        x = {k: t.float() - self.reference(k, t, ref) + residual.get(k, torch.zeros_like(t.float()))
             for k, t in upload.items()}
        message = pack(self.scheme, x)
        got = unpack(self.scheme, message)
        err = sum(float((x[k] - got[k] - residual.get(k, 0.0)).pow(2).sum()) for k in x)
        norm = sum(float(t.float().pow(2).sum()) for t in upload.values())
        # a tensor not uploaded this round (RoLoRA's other factor) keeps its residual for its next upload
        kept = {**residual, **{k: x[k] - got[k] for k in x}} if self.feedback else {}
        return message, kept, (err, norm)

    def decode(self, message: dict[str, Tensor], ref: dict[str, Tensor],
               expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
        """The server's ``θ̂ = ref + x̂`` of a client's message."""
        if not self.on:
            return dict(message)
        got = unpack(self.scheme, message, expected)
        return {k: self.reference(k, t, ref) + t for k, t in got.items()}

    def encode_once(self, upload: dict[str, Tensor]) -> dict[str, Tensor]:
        """The message of a one-shot upload (see the module docstring): ``upload`` coded as it is."""
        return pack(self.scheme, {k: t.float() for k, t in upload.items()}) if self.on else dict(upload)

    def decode_once(self, message: dict[str, Tensor],
                    expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, Tensor]:
        """The server's ``θ̂ = x̂`` of a one-shot upload's message."""
        return self.decode(message, {}, expected)


def upload_codec(cfg, strategy) -> Codec:
    """The job's upload coding: ``--compress``, with error feedback unless ``--no-error-feedback`` or
    the strategy's clients start every round from fresh factors (FLoRA, FlexLoRA: a residual of last
    round's factors means nothing to the next round's new ones)."""
    return Codec(parse_scheme(cfg.compress),
                 feedback=not cfg.no_error_feedback and not strategy.fresh_adapters)


def relative_error(parts: list[tuple[float, float]]) -> float:
    """``sqrt(Σ err² / Σ norm²)`` over a round's uploads (0 for an all-zero round)."""
    norm = sum(n for _, n in parts)
    return math.sqrt(sum(e for e, _ in parts) / norm) if norm > 0 else 0.0
