"""Score a batch of prompts two ways from one shared prefill: the reference answer's likelihood
and the greedy answer.

For prompts ``p_i`` (left-padded to P tokens) and reference completions ``c_i``:

1. one forward pass over the prompts fills the KV cache and gives the logits of the first
   answer token;
2. **teacher forcing**: the references ``c_i[:-1]`` continue from the cache, so
   ``nll_i = -Σ_j log p(c_ij | p_i, c_i<j)`` (the completion's tokens, end of turn included);
3. the cache is cut back to the P prompt positions, and **greedy decoding** continues from it:
   up to ``max_new`` tokens, a row stopping at its first stop token. A sliding-window layer
   (Mistral, Gemma-3, Qwen2's) records its states past the window after the prefill, so that it
   can be cut back too (tested).

Evaluating a generative task this way costs one prompt pass instead of two (one for the
teacher-forced loss, one for ``generate``'s prefill): prompts are long and answers short.
Rows are on client slot 0 (the global model). Equal to transformers' ``generate`` and to a
teacher-forced pass over the whole rows (tested).

:func:`score_choices` scores the choices of a multiple-choice question the same way: one
prefill per prompt, then choice j of every row teacher-forced from the prompts' cache (cut back
after each), so a batch costs one prompt pass plus one short pass per choice position (none
for choices of one token, whose log-probability the prefill's last logits already give).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _keywords(model) -> tuple[str, dict]:
    """``(name of the KV cache keyword, prefill keywords)``: the cache is ``cache`` since
    transformers 5.2x (``past_key_values`` before); the prefill keeps the logits of the last
    position only (``logits_to_keep``, where the model takes it), not a vocabulary row per token."""
    params = inspect.signature(model.forward).parameters
    last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return ("cache" if "cache" in params else "past_key_values"), last


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _right_pad(rows: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


@dataclass
class _Prefix:
    """The prompts' pass: the KV cache, the logits of each row's first answer token ``first``
    (B, V), the prompts' left-padded mask (B, P) and lengths (B,)."""

    model: object
    key: str
    cache: object
    first: Tensor
    mask: Tensor
    lens: Tensor


def _prefill(fm, prompts: list[list[int]], pad: int) -> _Prefix:
    model, device = fm.model, next(fm.parameters()).device
    fm.unrouted()                                                   # every row on slot 0, no dropout
    ids, mask = _left_pad(prompts, pad, device)                     # (B, P)
    key, last = _keywords(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                use_cache=True, **last)
    cache = getattr(out, key)
    # a sliding-window layer keeps only its window's states, and cannot be cut back once a continuation
    # reaches it; recording them (after the prefill, as transformers' generate does) lets it, at the
    # cost of a continuation's states; an ordinary layer (full attention) has no such switch
    record = getattr(cache, "activate_past_recording", None)
    if record is not None:
        record()
    return _Prefix(model, key, cache, out.logits[:, -1].float(), mask, mask.sum(dim=1))


def _continuation_nll(pre: _Prefix, rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """``(nll (B,), mask (B, C))``: each row's continuation teacher-forced from the prompts' cache,
    its token losses summed; the cache is cut back to the prompt positions afterwards."""
    device = pre.mask.device
    comp, cmask = _right_pad(rows, pad, device)                     # (B, C)
    nll = F.cross_entropy(pre.first, comp[:, 0], reduction="none") * cmask[:, 0]
    if comp.shape[1] > 1:
        steps = comp.shape[1] - 1
        nxt = pre.model(input_ids=comp[:, :-1], attention_mask=torch.cat([pre.mask, cmask[:, :-1]], dim=1),
                        position_ids=pre.lens[:, None] + torch.arange(steps, device=device), use_cache=True,
                        **{pre.key: pre.cache}).logits.float()      # (B, C-1, V): predicts comp[:, 1:]
        tok = F.cross_entropy(nxt.reshape(-1, nxt.shape[-1]), comp[:, 1:].reshape(-1),
                              reduction="none").view(-1, steps)
        nll = nll + (tok * cmask[:, 1:]).sum(dim=1)
        pre.cache.crop(-steps)  # back to the P prompt positions (a negative count: every version)
    return nll, cmask


@torch.no_grad()
def score_and_generate(fm, prompts: list[list[int]], completions: list[list[int]], max_new: int,
                       stop_ids: list[int], pad: int) -> tuple[Tensor, Tensor, list[list[int]]]:
    """``(nll (B,), reference tokens (B,), greedy tokens per row)`` for one batch.

    ``nll`` sums each reference completion's token losses; the greedy tokens stop before the
    first stop token (or after ``max_new`` tokens).
    """
    pre = _prefill(fm, prompts, pad)
    nll, cmask = _continuation_nll(pre, completions, pad)           # 1. the references, teacher-forced
    # 2. greedy answers from the same prompt cache
    model, key, cache, mask, lens = pre.model, pre.key, pre.cache, pre.mask, pre.lens
    stops = torch.tensor(stop_ids, device=mask.device)
    token = pre.first.argmax(dim=-1)
    done = torch.isin(token, stops)
    answers = [[] if bool(d) else [int(t)] for t, d in zip(token, done, strict=True)]
    for j in range(1, max_new):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=(lens + j - 1)[:, None],
                       use_cache=True, **{key: cache}).logits[:, -1]
        token = logits.argmax(dim=-1)
        stopped = torch.isin(token, stops)
        for i in (~done & ~stopped).nonzero().flatten().tolist():
            answers[i].append(int(token[i]))
        done = done | stopped
    return nll, cmask.sum(dim=1), answers


@torch.no_grad()
def score_choices(fm, prompts: list[list[int]], choices: list[list[list[int]]],
                  pad: int) -> list[list[float]]:
    """``scores[i][j]``: the summed log-probability of choice j's tokens given prompt i, for one batch
    (rows may have different numbers of choices, choices different numbers of tokens)."""
    pre = _prefill(fm, prompts, pad)
    scores = [[0.0] * len(row) for row in choices]
    for j in range(max(len(row) for row in choices)):
        rows = [row[j] if j < len(row) else [pad] for row in choices]  # a stand-in: row has no choice j
        nll, _ = _continuation_nll(pre, rows, pad)
        for i, row in enumerate(choices):
            if j < len(row):
                scores[i][j] = -float(nll[i])
    return scores
