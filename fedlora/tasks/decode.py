"""Score a batch of prompts two ways from one shared prefill: the reference answer's likelihood
and the greedy answer.

For prompts ``p_i`` (left-padded to P tokens) and reference completions ``c_i``:

1. one forward pass over the prompts fills the KV cache and gives the logits of the first
   answer token;
2. **teacher forcing**: the references ``c_i[:-1]`` continue from the cache, so
   ``nll_i = -Σ_j log p(c_ij | p_i, c_i<j)`` (the completion's tokens, end of turn included);
3. the cache is cut back to the P prompt positions, and **greedy decoding** continues from it:
   up to ``max_new`` tokens, a row stopping at its first stop token.

Evaluating a generative task this way costs one prompt pass instead of two (one for the
teacher-forced loss, one for ``generate``'s prefill): prompts are long and answers short.
Rows are on client slot 0 (the global model). Equal to transformers' ``generate`` and to a
teacher-forced pass over the whole rows (tested).
"""

from __future__ import annotations

import inspect

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


@torch.no_grad()
def score_and_generate(fm, prompts: list[list[int]], completions: list[list[int]], max_new: int,
                       stop_ids: list[int], pad: int) -> tuple[Tensor, Tensor, list[list[int]]]:
    """``(nll (B,), reference tokens (B,), greedy tokens per row)`` for one batch.

    ``nll`` sums each reference completion's token losses; the greedy tokens stop before the
    first stop token (or after ``max_new`` tokens).
    """
    model, device = fm.model, next(fm.parameters()).device
    fm.router.routing = None                                        # every row on slot 0
    ids, mask = _left_pad(prompts, pad, device)                     # (B, P)
    lens = mask.sum(dim=1)                                          # (B,)
    key, last = _keywords(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                use_cache=True, **last)
    cache, first = getattr(out, key), out.logits[:, -1].float()     # first: (B, V)
    # 1. the reference completions, teacher-forced from the prompt's cache
    comp, cmask = _right_pad(completions, pad, device)              # (B, C)
    nll = F.cross_entropy(first, comp[:, 0], reduction="none") * cmask[:, 0]
    if comp.shape[1] > 1:
        steps = comp.shape[1] - 1
        nxt = model(input_ids=comp[:, :-1], attention_mask=torch.cat([mask, cmask[:, :-1]], dim=1),
                    position_ids=lens[:, None] + torch.arange(steps, device=device), use_cache=True,
                    **{key: cache}).logits.float()                  # (B, C-1, V): predicts comp[:, 1:]
        tok = F.cross_entropy(nxt.reshape(-1, nxt.shape[-1]), comp[:, 1:].reshape(-1),
                              reduction="none").view(-1, steps)
        nll = nll + (tok * cmask[:, 1:]).sum(dim=1)
        cache.crop(-steps)  # back to the P prompt positions (a negative count: every version)
    # 2. greedy answers from the same prompt cache
    stops = torch.tensor(stop_ids, device=device)
    token = first.argmax(dim=-1)
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
