"""``--fewshot N``: each held-out prompt led by N solved examples, as lm-eval-harness' ``--num_fewshot``.

The shots are other held-out examples and their reference answers, drawn for each question from
``--seed`` and its position (never the question itself, nor a copy of it: a duplicate row would
give its own answer away, as lm-eval leaves out a shot equal to the question), and given as the
conversation before it::

    user: q_a   assistant: r_a   user: q_b   assistant: r_b   …   user: q_i  →  the answer scored

The chat template renders these turns as it renders any conversation (lm-eval's
``--fewshot_as_multiturn``); ``--chat-template plain`` joins them with blank lines. Every
evaluation reads them alike: greedy answers, ``--eval mc`` (whose answers are the right choices'
texts) and ``--eval mc-letters`` (the shots lettered as the question is). A prompt that no longer
fits ``--max-length`` loses its first shots first (the prompts are cut from the left).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedlora.data.loading import TextDataset
from fedlora.errors import UserError


def _turns(prompt) -> list[dict]:
    """A prompt as chat turns: a text is one user message; a chat's system messages are left out (a
    template takes one system message, first: the question's own, which :func:`with_shots` puts
    before the shots)."""
    if isinstance(prompt, list):
        return [m for m in prompt if m["role"] != "system"]
    return [{"role": "user", "content": prompt}]


def _skipping(d: int, own: list[int]) -> int:
    """The ``d``-th position (from 0) that is not one of ``own`` (sorted)."""
    for e in own:
        d += d >= e
    return d


def with_shots(ds: TextDataset, shots: int, seed: int) -> TextDataset:
    """``ds`` with each prompt led by ``shots`` other examples of ``ds`` and their responses (the
    module docstring); ``ds`` itself when ``shots`` is 0.

    Raises
    ------
    UserError
        ``ds`` has no more examples than ``shots``, or no reference responses.
    """
    if not shots:
        return ds
    keys = [p if isinstance(p, str) else repr(p) for p in ds.texts]
    copies: dict[str, list[int]] = {}                       # a prompt's positions, in order
    for i, key in enumerate(keys):
        copies.setdefault(key, []).append(i)
    if ds.responses is None or len(ds) - max(map(len, copies.values()), default=0) < shots:
        raise UserError(f"--fewshot {shots} leads each held-out question with {shots} others and their"
                        f" answers, and there are {len(ds)} held-out examples"
                        f"{'' if len(copies) == len(ds) else f' ({len(copies)} different questions)'}:"
                        " pass a smaller --fewshot")
    prompts = []
    for i, prompt in enumerate(ds.texts):
        same = copies[keys[i]]                              # the question and its copies: no shots
        drawn = np.random.default_rng([seed, 4271, i]).choice(len(ds) - len(same), size=shots, replace=False)
        turns = []
        for j in (_skipping(int(d), same) for d in drawn):
            turns += [*_turns(ds.texts[j]), {"role": "assistant", "content": ds.responses[j]}]
        system = [m for m in prompt if m["role"] == "system"] if isinstance(prompt, list) else []
        prompts.append([*system, *turns, *_turns(prompt)])
    return replace(ds, texts=prompts)
