"""How an example becomes tokens: its prompt and completion texts, then their token ids.

:class:`ChatFormat` renders ``(prompt, response)`` with the chat template (or plain text) as
``(prompt text, completion text)``: the prompt with the assistant's turn opened, and the rest
of the rendered conversation (the response and the end of its turn).

:func:`encode_pairs` tokenizes the two as one text and splits the ids where the prompt's own
ids end::

    whole = ids(prompt text + completion text)        # what the model reads in use
    head  = ids(prompt text)                          # what a greedy answer starts from
    completion = whole[len(head):]   if whole starts with head
               = ids(completion text) otherwise       # a token across the boundary

A completion tokenized on its own is not always its tokens in the conversation: a
SentencePiece tokenizer with a dummy prefix (LLaMA-2's, Mistral-7B-v0.1's) puts a "▁" before
every text it encodes, so ``" positive</s>"`` alone is ``▁ ▁positive </s>``, while after
``[/INST]`` it is ``▁positive </s>``. Training on the first teaches the model a space token
it never reads in use, and scoring it adds that token's log-probability to every choice.
Byte-level BPE (SmolLM2, GPT-2, Llama-3) and WordPiece give the same ids either way.
"""

from __future__ import annotations

from pathlib import Path

from jinja2.exceptions import TemplateError

from fedlora.errors import UserError, first_line, say

__all__ = ["ChatFormat", "encode_pairs", "leading_bos", "system_in_user"]


#: Chat templates found to refuse a system message in this process (said once each).
NO_SYSTEM_TEMPLATES: set[str] = set()


def _leads_with_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its beginning-of-text token before a text it encodes."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    added, bare = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    return added[:1] == [bos] and bare[:1] != [bos]


def _bos_prefix(tokenizer) -> str:
    """The text that leads a ``plain`` prompt: the beginning-of-text token where the tokenizer puts
    it before every text (else nothing), followed by what makes the prompt, encoded without special
    tokens, the ids the tokenizer gives the prompt alone: nothing for LLaMA-2's "legacy" tokenizer
    (its normalizer prefixes every piece of text with "▁"), a space for a ``Metaspace`` pre-tokenizer
    that prefixes only a text's first piece (``prepend_scheme="first"``: the prompt's first word would
    lose its "▁" after the token)."""
    if not _leads_with_bos(tokenizer):
        return ""
    sample, bos = "Answer this", tokenizer.bos_token
    alone = tokenizer(sample)["input_ids"]
    for space in ("", " "):
        ids = tokenizer(bos + space + sample, add_special_tokens=False)["input_ids"]
        if ids in (alone, alone[:-1]):  # [:-1]: a tokenizer that also ends a text with its eos
            return bos + space
    return bos


def leading_bos(tokenizer) -> int | None:
    """The beginning-of-text id where ``tokenizer`` puts it before every text it encodes (LLaMA's,
    Mistral's, Gemma's), which a prompt cut to fit ``--max-length`` keeps
    (:func:`~fedlora.tasks.sft.cut_prompts`); else None."""
    return tokenizer.bos_token_id if _leads_with_bos(tokenizer) else None


class ChatFormat:
    """Renders ``(prompt, response)`` as ``(prompt text, completion text)``.

    ``mode``: ``"model"`` (the tokenizer's chat template), ``"plain"`` (the prompt's
    contents, a newline, then the response and the end-of-text token; led by the beginning-of-text
    token where the tokenizer puts one before every text it encodes, as LLaMA's and Gemma's
    do: examples are encoded without special tokens, and the prompt has the ids the tokenizer gives it
    alone, :func:`_bos_prefix`), or a path to a
    Jinja chat template file. ``system``: a system message put before every prompt that
    has none (empty: none, so the template's default applies). A template that refuses a system
    message (Gemma's) gets it at the start of the first user message instead, said once.
    """

    def __init__(self, tokenizer, mode: str = "model", system: str = "") -> None:
        self.tokenizer, self.plain, self.system = tokenizer, mode == "plain", system
        if mode not in ("model", "plain"):
            path = Path(mode).expanduser()
            if not path.is_file():
                raise UserError(f"--chat-template {mode!r}: use model, plain or an existing Jinja file")
            tokenizer.chat_template = path.read_text()
        elif mode == "model" and not getattr(tokenizer, "chat_template", None):
            raise UserError("this model's tokenizer has no chat template, which --task sft and dpo render"
                            " prompts with; pass --chat-template plain, or --chat-template FILE.jinja")
        self.fold_system = getattr(tokenizer, "chat_template", None) in NO_SYSTEM_TEMPLATES
        self.bos = _bos_prefix(tokenizer) if self.plain else ""

    def split(self, prompt, response: str) -> tuple[str, str]:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if self.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        if self.plain:
            end = self.tokenizer.eos_token or ""
            return self.bos + "\n\n".join(m["content"] for m in messages) + "\n", response + end
        # a template with a thinking switch (Qwen3's) renders with it off: the answer follows the
        # prompt's empty thinking block, not one the completion would teach the model to write; a
        # template whose switch renders the prompt otherwise once the answer follows, as it is
        for switch in ({"enable_thinking": False}, {}):
            head = self._render(messages, add_generation_prompt=True, **switch)
            full = self._render(messages + [{"role": "assistant", "content": response}], **switch)
            if full.startswith(head):
                return head, full[len(head):].rstrip()
        raise UserError("the chat template renders a prompt differently once the answer follows;"
                        " pass --chat-template plain or a Jinja file")

    def _render(self, messages: list[dict], **kwargs) -> str:
        """The chat template's text of ``messages``; a refused system message is retried in the
        first user message (and so every later one)."""
        if self.fold_system:
            messages = system_in_user(messages)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except TemplateError as exc:
            if self.fold_system or messages[0]["role"] != "system":
                roles = " ".join(m["role"] for m in messages)
                said = " ".join(str(messages[0]["content"]).split())[:40]
                raise UserError(f"the chat template refuses the messages of roles {roles}"
                                f" ({first_line(exc)}), starting {said!r}: fix the data's roles, or pass"
                                " --chat-template plain or a Jinja file") from None
            self.fold_system = True
            NO_SYSTEM_TEMPLATES.add(self.tokenizer.chat_template)
            say("the chat template takes no system message; it is put at the start of the first"
                " user message instead")
            return self._render(messages, **kwargs)


def system_in_user(messages: list[dict]) -> list[dict]:
    """``messages`` with a leading system message joined to the start of the user message after it
    (a user message of its own when none follows)."""
    if messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    """``(prompt ids, completion ids)`` of each ``(prompt text, completion text)`` of ``pairs``,
    without special tokens added: the prompt's ids on their own, and the completion's ids in the
    whole text after them (the module docstring). Where the prompt's own ids do not start the
    whole's (a token spans the boundary), the completion is tokenized on its own."""
    if not pairs:
        return [], []
    unique = list(dict.fromkeys(h for h, _ in pairs))      # a question's choices share its prompt
    once = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True))
    heads = [list(once[h]) for h, _ in pairs]
    wholes = tokenizer([h + t for h, t in pairs], add_special_tokens=False)["input_ids"]
    apart = [i for i, (h, w) in enumerate(zip(heads, wholes, strict=True)) if w[:len(h)] != h]
    alone = tokenizer([pairs[i][1] for i in apart], add_special_tokens=False)["input_ids"] if apart else []
    tails = [w[len(h):] for h, w in zip(heads, wholes, strict=True)]
    for i, ids in zip(apart, alone, strict=True):
        tails[i] = ids
    return heads, tails
