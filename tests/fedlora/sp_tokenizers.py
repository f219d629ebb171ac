"""SentencePiece-style tokenizers built in this process with the ``tokenizers`` library (no
``sentencepiece``, no download): LLaMA-2's "legacy" one (a dummy prefix, ``<s>`` before every text,
byte fallback, no pad token), Gemma's (no prefix, turn tokens) and T5's."""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerFast

BYTES = [f"<0x{i:02X}>" for i in range(256)]
WORDS = ("the a of to and in is was what which capital city france paris germany berlin answer question"
         " review movie great bad good film story positive negative yes no one two three").split()
#: LLaMA-2's chat template: it writes the beginning-of-text token itself.
LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")


def llama2_tokenizer(template: str | None = LLAMA2_TEMPLATE, legacy: bool = True) -> PreTrainedTokenizerFast:
    """A LLaMA-2 "legacy" tokenizer of about 400 tokens: BPE with byte fallback, a dummy prefix "▁"
    (a normalizer), ``<s>`` before every text, and no pad token (as LLaMA-2's). Not ``legacy``: the
    prefix from a ``Metaspace`` pre-tokenizer on a text's first piece only (``prepend_scheme="first"``),
    as LLaMA tokenizers converted with ``legacy=False`` have it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(60)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400,
                                                        special_tokens=["<unk>", "<s>", "</s>", *BYTES]))
    tok.pre_tokenizer = None   # trained on "▁word" pieces; encoded as LLaMA-2's tokenizer.json does
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    data = json.loads(tok.to_str())   # the byte pieces are ordinary tokens, as in LLaMA's tokenizer.json
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in BYTES]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.chat_template = template
    out.pad_token = out.eos_token   # what fedlora's loader sets where a tokenizer has no pad token
    return out


#: Gemma's chat template: no system message, turns between <start_of_turn> and <end_of_turn>.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant'"
    " else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim"
    " + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A Gemma-like tokenizer: BPE with byte fallback and no dummy prefix, ``<bos>`` before every
    text, and turn tokens that are added special tokens without a name in the special-tokens map."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(60)]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials + BYTES))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in BYTES]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", pad_token="<pad>")
    out.chat_template = GEMMA_TEMPLATE
    return out


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-like tokenizer: Unigram with a "▁" prefix on every word, ``</s>`` after every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(60)]
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=120, unk_token="<unk>",
                                                            special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
