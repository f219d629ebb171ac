"""--task dpo: the loss, its gradient and DP-SGD's per-pair norms equal a direct computation of the
DPO formula; the reference is the base with the adapters off; batched equals one client at a time;
the data forms and their refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.data.loading import TextDataset
from fedlora.errors import SAID, UserError
from fedlora.job.checks import check_job_args
from fedlora.job.schema import JobConfig
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.models.state import apply_global
from fedlora.privacy.dpsgd import example_norms
from fedlora.strategies import GlobalState
from fedlora.tasks import TEST, gather_rows, get_task, row_groups
from fedlora.training.train import ClientSampler, TrainConfig, _step, train_clients
from tests.fedlora.test_lora_dropout_dp import assert_alone, fedlora_per_example

BETA = 0.5
#: Pairs of unequal lengths: (prompt, chosen, rejected).
PAIRS = [("a rather long question about the plot of the film", "it was good", "bad"),
         ("short", "yes", "no, not at all, never"),
         ("which word fits here", "one", "two words"),
         ("tell me", "a longer answer with several words", "short one")]


@pytest.fixture(scope="module")
def tok(tiny_chat_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_chat_llama_dir)


def _fm(model_dir, slots: int = 1, seed: int = 3, dropout: float = 0.0) -> FederatedModel:
    """The tiny chat LLaMA with the same random (nonzero) adapter in every slot."""
    config = AdapterConfig(ranks=[4] * slots, alpha=8.0, target_modules=["all-linear"], train_head=False,
                           dropout=dropout)
    fm = FederatedModel(AutoModelForCausalLM.from_pretrained(model_dir), config)
    g = torch.Generator().manual_seed(seed)
    factors = {n: (0.3 * torch.randn(4, m.lora_A.shape[2], generator=g),
                   0.3 * torch.randn(m.lora_B.shape[1], 4, generator=g)) for n, m in fm.adapters.items()}
    apply_global(fm, GlobalState(factors=factors, scale=2.0), {})
    return fm


def _cfg(**kw) -> JobConfig:
    return JobConfig(task="dpo", model="unused", **{"max_length": 40, "dpo_beta": BETA, **kw})


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                            for p, c, r in PAIRS))
    return path


def _logp(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion | prompt), summed, from one unpadded row (slot 0 for a FederatedModel)."""
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt) - 1 + t, c] for t, c in enumerate(completion))


def _pieces(tok, cfg):
    """Each pair's (prompt, chosen, rejected) token ids as --task sft renders them."""
    sft, prompts = get_task("sft"), [p for p, _, _ in PAIRS]
    p, good = sft.pieces(tok, TextDataset(prompts, None, [], [c for _, c, _ in PAIRS]), cfg)
    _, bad = sft.pieces(tok, TextDataset(prompts, None, [], [r for _, _, r in PAIRS]), cfg)
    return list(zip(p, good, bad, strict=True))


def _encoded(tok, fm, spec, cfg):
    task = get_task("dpo")
    data = task.encode(tok, task.load(str(spec), cfg), cfg)
    task.prepare(fm, data, cfg)
    return data


def _one_step(fm, data) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One training step of slot 0 over every pair: its loss, and the gradient of each trained tensor."""
    step = TrainConfig(task=get_task("dpo"), batch_size=len(PAIRS), local_steps=1)
    got = _step(fm, data, [ClientSampler(range(len(PAIRS)), seed=0)], torch.zeros(1, dtype=torch.long),
                step, torch.device("cpu"))
    return got, [p.grad[0].clone() for p in fm.trainable_parameters()]


def test_reference_loss_and_gradient_equal_the_dpo_formula(tiny_chat_llama_dir, tok, pairs_file):
    # Prepare: pairs encoded, their reference computed by the adapted model with its adapters off
    cfg = _cfg()
    fm = _fm(tiny_chat_llama_dir)
    data = _encoded(tok, fm, pairs_file, cfg)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)
    pieces = _pieces(tok, cfg)
    # Assert: the cached reference is the bare base model's log-probability of each response
    with torch.no_grad():
        ref = torch.tensor([[float(_logp(base, p, c)), float(_logp(base, p, r))] for p, c, r in pieces])
    assert torch.allclose(data["ref_logps"], ref, rtol=1e-5, atol=1e-5)
    # Execute: one step over every pair (dynamic padding groups the rows by length)
    task = get_task("dpo")
    got, grads = _one_step(fm, data)
    # the formula, pair by pair: mean of -log σ(β[(log π - log π_ref)(y_w) - (log π - log π_ref)(y_l)])
    fm.zero_grad(set_to_none=True)
    margins = torch.stack([BETA * ((_logp(fm, p, c) - ref[i, 0]) - (_logp(fm, p, r) - ref[i, 1]))
                           for i, (p, c, r) in enumerate(pieces)])
    want = -F.logsigmoid(margins).mean()
    want.backward(retain_graph=True)  # the margins are used again below
    # Assert: the same loss and the same gradient of every trained tensor
    assert float(got[0]) == pytest.approx(want.item(), rel=1e-5)
    for g, p in zip(grads, fm.trainable_parameters(), strict=True):
        assert torch.allclose(g, p.grad[0], rtol=1e-4, atol=1e-6)
    # and DP-SGD's per-example gradient is the pair's: its norm is that of the pair's own loss
    dp = TrainConfig(task=task, batch_size=2, dp_sample=True, max_grad_norm=1.0)
    norms = example_norms(fm, data, list(range(len(PAIRS))), dp, torch.device("cpu"))
    per_pair = []
    for margin in margins:
        fm.zero_grad(set_to_none=True)
        (-F.logsigmoid(margin)).backward(retain_graph=True)
        per_pair.append(float(sum(t.grad[0].pow(2).sum() for t in fm.trainable_parameters()).sqrt()))
    assert sorted(norms.tolist()) == pytest.approx(sorted(per_pair), rel=1e-4)


def test_sft_weight_adds_the_chosen_per_token_nll_to_each_pairs_loss(tiny_chat_llama_dir, tok, pairs_file):
    # Prepare: α = 0.7 (RPO's term); the reference as the base computes it
    alpha = 0.7
    cfg = _cfg(dpo_sft_weight=alpha)
    fm = _fm(tiny_chat_llama_dir)
    data = _encoded(tok, fm, pairs_file, cfg)
    pieces = _pieces(tok, cfg)
    ref = data["ref_logps"]
    # Execute: one step over every pair
    got, grads = _one_step(fm, data)
    # the formula: mean over pairs of -log σ(margin) - α log π(y_w) / |y_w|
    fm.zero_grad(set_to_none=True)
    terms = []
    for i, (p, c, r) in enumerate(pieces):
        good, bad = _logp(fm, p, c), _logp(fm, p, r)
        margin = BETA * ((good - ref[i, 0]) - (bad - ref[i, 1]))
        terms.append(-F.logsigmoid(margin) - alpha * good / len(c))
    want = torch.stack(terms).mean()
    want.backward()
    # Assert: the same loss and gradient, and the term is there (α = 0 gives a smaller loss)
    assert float(got[0]) == pytest.approx(want.item(), rel=1e-5)
    for g, p in zip(grads, fm.trainable_parameters(), strict=True):
        assert torch.allclose(g, p.grad[0], rtol=1e-4, atol=1e-6)
    plain = sum(float(-F.logsigmoid(BETA * ((_logp(fm, p, c) - ref[i, 0]) - (_logp(fm, p, r) - ref[i, 1]))))
                for i, (p, c, r) in enumerate(pieces)) / len(PAIRS)
    assert float(got[0]) > plain + 0.1


def test_negative_dpo_weights_are_refused_in_one_line():
    for kw in ({"dpo_sft_weight": -1.0}, {"dpo_beta": 0.0}):
        with pytest.raises(UserError, match="--dpo-beta must be > 0 and --dpo-sft-weight ≥ 0"):
            check_job_args(JobConfig(task="dpo", model="m", data="d.jsonl", **kw))


def test_cut_prompts_are_counted_once_a_pair(tok, pairs_file, capsys):
    # Execute: a --max-length that cuts the long first prompt (15 tokens), in its chosen (4 more) and
    # its rejected row (2 more); no other row is longer than 14
    cfg = _cfg(max_length=16)
    task = get_task("dpo")
    data = task.encode(tok, task.load(str(pairs_file), cfg), cfg)
    # Assert: one warning, counting pairs
    err = [line for line in capsys.readouterr().err.splitlines() if "exceed --max-length" in line]
    assert len(err) == 1 and "1 of 4 dpo pairs exceed --max-length 16" in err[0]
    assert data["input_ids"].shape[1:] == (2, 16)


def test_held_out_label_word_pairs_are_cut_once_for_pairs_and_answers(tok, sentiment_tsv, capsys):
    # Prepare: label-word pairs whose prompts a short --max-length cuts
    cfg = _cfg(text_column="sentence", label_words="0=negative,1=positive", prompt_template="Review: {text}",
               max_length=8)
    dpo, sft = get_task("dpo"), get_task("sft")
    ds = dpo.load(str(sentiment_tsv), cfg)
    # Execute
    held = dpo.eval_set(tok, ds, cfg)
    err = [line for line in capsys.readouterr().err.splitlines() if "exceed --max-length" in line]
    # Assert: one warning (the pairs'), and the answers' prompts are SFT's for the chosen responses
    assert len(err) == 1 and "dpo pairs" in err[0]
    plain = sft.generation_set(tok, ds, cfg)
    assert (held.answers.prompts, held.answers.completions, held.answers.answers) == (
        plain.prompts, plain.completions, plain.answers)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_batched_clients_equal_one_client_at_a_time(tiny_chat_llama_dir, tok, pairs_file, dropout):
    # Prepare: two clients of two pairs each, with the same starting adapter (--lora-dropout: a pair's
    # two rows have keys of their own, kept together whatever the layout)
    cfg = _cfg()
    task = get_task("dpo")
    batched = _fm(tiny_chat_llama_dir, slots=2, dropout=dropout)
    data = _encoded(tok, batched, pairs_file, cfg)
    # (with dropout, SGD: AdamW moves an entry by about lr whatever its gradient's size, so an entry
    # with a tiny gradient turns float32 differences of ~3e-6 of the largest gradient into ~1e-4)
    step = TrainConfig(task=task, batch_size=2, local_steps=2, lr=1e-2,
                       optimizer="sgd" if dropout else "adamw")
    parts = [[0, 1], [2, 3]]
    # Execute: both in one pass, then each alone
    losses = train_clients(batched, data, [ClientSampler(p, seed=k) for k, p in enumerate(parts)], step)
    for k, part in enumerate(parts):
        solo = _fm(tiny_chat_llama_dir, dropout=dropout)
        alone = train_clients(solo, data, [ClientSampler(part, seed=k)], step)
        # Assert: the same loss and the same trained adapter
        assert alone[0] == pytest.approx(losses[k], rel=1e-5)
        for a, b in zip(batched.trainable_parameters(), solo.trainable_parameters(), strict=True):
            assert torch.allclose(a[k], b[0], rtol=1e-4, atol=1e-6)


def test_data_forms_and_label_word_pairs(tok, tmp_path, sentiment_tsv):
    task = get_task("dpo")
    # chat message lists (the prompt is what precedes the assistant's last message)
    chat = tmp_path / "chat.jsonl"
    turn = [{"role": "user", "content": "hi"}]
    chat.write_text(json.dumps({"chosen": [*turn, {"role": "assistant", "content": "hello"}],
                                "rejected": [*turn, {"role": "assistant", "content": "go away"}]}) + "\n")
    ds = task.load(str(chat), _cfg())
    assert (ds.texts, ds.responses, ds.rejected) == ([turn], ["hello"], ["go away"])
    # a labeled file with --label-words: the right word chosen, the other label's rejected
    cfg = _cfg(text_column="sentence", label_words="0=negative,1=positive", prompt_template="Review: {text}")
    ds = task.load(str(sentiment_tsv), cfg)
    words = ["negative", "positive"]
    assert ds.responses == [words[y] for y in ds.labels] and ds.rejected == [words[1 - y] for y in ds.labels]
    # held out, it is scored by answer accuracy too (the headline)
    assert task.eval_set(tok, ds.subset([0, 1]), cfg).headline == "answer_accuracy"


#: hh-rlhf's raw rows (two turns, the second answered two ways), TRL's explicit-prompt rows (the
#: answer lists hold the assistant's turn alone; the prompt a message list, or text).
HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: A joke?\n\nAssistant: Why not.",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: A joke?\n\nAssistant: No."}
HH_PROMPT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "A joke?"}]
TRL = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
       "rejected": [{"role": "assistant", "content": "5"}]}


@pytest.mark.parametrize("row, prompt, chosen, rejected", [
    (HH, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
          {"role": "user", "content": "A joke?"}], "Why not.", "No."),
    (TRL, [{"role": "user", "content": "2+2?"}], "4", "5"),
    ({**TRL, "prompt": "2+2?"}, [{"role": "user", "content": "2+2?"}], "4", "5"),
    # Dahoas' rm-static: the prompt a transcript ending in the assistant's empty turn, the answers text
    # (the transcript was one user message holding "Human:" and "Assistant:")
    ({"prompt": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: A joke?\n\nAssistant:", "chosen": " Why not.",
      "rejected": " No."}, HH_PROMPT, " Why not.", " No."),
])
def test_hh_rlhf_transcripts_and_trl_explicit_prompts_are_chat_pairs(tmp_path, row, prompt, chosen, rejected):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    ds = get_task("dpo").load(str(path), _cfg())
    assert (ds.texts, ds.responses, ds.rejected) == ([prompt], [chosen], [rejected])


def test_an_hh_rlhf_pair_whose_last_turn_is_empty_is_skipped_as_empty(tmp_path, capsys):
    # Prepare: one pair whose rejected transcript ends in "Assistant:" with nothing after it (no space:
    # it was read as text beside a message list, and the whole file refused)
    empty = {**HH, "rejected": HH["rejected"].removesuffix(" No.")}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(HH) + "\n" + json.dumps(empty) + "\n")
    # Execute
    ds = get_task("dpo").load(str(path), _cfg())
    # Assert
    assert ds.responses == ["Why not."] and "1 of 2 pairs in p.jsonl have an empty" in capsys.readouterr().err


def test_text_answers_that_look_like_json_arrays_are_text(tmp_path):
    # Prepare: answers that are lists written as text (they were read as chat lists and refused)
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "List 3 numbers", "chosen": "[0, 1, 2]", "rejected": "[]"},
            {"prompt": "One entity?", "chosen": '[{"entity": "Alice"}]', "rejected": "[0]"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Execute
    ds = get_task("dpo").load(str(path), _cfg())
    # Assert
    assert ds.texts == ["List 3 numbers", "One entity?"]
    assert (ds.responses, ds.rejected) == (["[0, 1, 2]", '[{"entity": "Alice"}]'], ["[]", "[0]"])


def test_identical_pairs_are_skipped_with_one_warning_or_refused(tmp_path, capsys):
    SAID.clear()
    task, path = get_task("dpo"), tmp_path / "p.jsonl"
    rows = [("q1", "same", "same"), ("q2", "good", "bad"), ("q3", "x", " x ")]
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    ds = task.load(str(path), _cfg())
    task.load(str(path), _cfg())              # a job reads its data twice (its --max-length, then its rows)
    assert ds.texts == ["q2"] and ds.rejected == ["bad"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of 3 pairs" in err[0]
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(UserError, match="identical in all 1 pairs"):
        task.load(str(path), _cfg())


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "q", "response": "a"}], "has no chosen/rejected columns"),
    ([{"chosen": "a", "rejected": "b"}], "a prompt column is needed"),
    ([{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
       "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}],
     "differ before their last"),
])
def test_data_without_pairs_is_refused(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=message):
        get_task("dpo").load(str(path), _cfg())


def test_opacus_is_refused_and_auto_picks_the_pair_kernels():
    cfg = _cfg(dp="sample", epsilon=8.0, delta=1e-3)
    assert cfg.dp_backend_for(lone=True) == "fedlora"
    with pytest.raises(UserError, match="--dp-backend opacus clips each model row"):
        check_job_args(_cfg(dp="sample", epsilon=8.0, delta=1e-3, dp_backend="opacus"))
    with pytest.raises(UserError, match="--dpo-beta is for --task dpo"):
        check_job_args(JobConfig(task="sft", model="unused", dpo_beta=0.2))


def test_pairs_are_gathered_whole_and_grouped_by_their_longer_row():
    # Prepare: 3 pairs of rows of (2, 5), (4, 4) and (1, 1) tokens, right-padded to 8
    mask = torch.tensor([[[1] * n + [0] * (8 - n) for n in pair] for pair in ((2, 5), (4, 4), (1, 1))])
    data = {"input_ids": torch.arange(48).view(3, 2, 8), "attention_mask": mask, "labels": mask - 1,
            "ref_logps": torch.arange(6.0).view(3, 2), "dpo_beta": torch.full((3,), 0.1)}
    # Execute / Assert: both rows of a pair come together, cut after the longest row (5 tokens)
    batch = gather_rows(data, [1, 0], torch.device("cpu"))
    assert batch["input_ids"].shape == (2, 2, 5) and batch["input_ids"][1, 1].tolist() == [8, 9, 10, 11, 12]
    assert batch["ref_logps"].tolist() == [[2.0, 3.0], [0.0, 1.0]]
    # the passes group pairs by their longer row (5, 4, 1: three passes, 10·1.2 < 11·1.1 < 15 tokens)
    groups = row_groups(data, torch.tensor([0, 1, 2]), pad_to_longest=True)
    assert [g.tolist() for g in groups] == [[2], [1], [0]]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": None}],
     "p.jsonl row 2: 'rejected' is null"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}],
     r"p.jsonl row 2 has no 'rejected' column, which the first row's form \(chosen/rejected\) needs"),
    ([{"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}],
     "p.jsonl row 1: 'chosen' is a message list but 'rejected' is text; give both as message lists or both"),
    ([{"prompt": "q", "chosen": "a", "rejected": {"text": "b"}}], "p.jsonl row 1: 'rejected' is a dict"),
], ids=["null-rejected", "missing-rejected", "list-beside-text", "dict-rejected"])
def test_bad_pair_cells_are_refused_with_their_row(tmp_path, rows, message):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=message):
        get_task("dpo").load(str(path), _cfg())


def test_pairs_with_an_empty_response_are_skipped_with_one_warning_or_refused(tmp_path, capsys):
    SAID.clear()
    path = tmp_path / "e.jsonl"
    rows = [("q1", "good", ""), ("q2", "good", "bad"), ("q3", " ", "bad")]
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    ds = get_task("dpo").load(str(path), _cfg())
    assert ds.texts == ["q2"] and ds.rejected == ["bad"]
    assert capsys.readouterr().err.strip() == ("fedlora: 2 of 3 pairs in e.jsonl have an empty chosen or"
                                               " rejected response; they were skipped")
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": ""}) + "\n")
    with pytest.raises(UserError, match=r"e.jsonl: every pair \(all 1\) has an empty chosen or rejected"):
        get_task("dpo").load(str(path), _cfg())


def test_a_labeled_test_file_rejects_from_every_label_word(tmp_path, pairs_file):
    # Prepare: a held-out file of label 1 only, beside training pairs; --label-words name 0 and 1
    test = tmp_path / "pos.csv"
    test.write_text("text,label\ngood,1\nfine,1\n")
    cfg = _cfg(data=str(pairs_file), test_data=str(test), label_words="0=negative,1=positive",
               prompt_template="S? {text}")
    task = get_task("dpo")
    # Execute: the pairs file is read as pairs (the flags are for the labeled test file)
    train, held = task.load(str(pairs_file), cfg), task.load(str(test), cfg, role=TEST)
    # Assert: "negative" is rejected (before: the test file's one label, refused as identical pairs)
    assert train.responses == [c for _, c, _ in PAIRS] and train.texts == [p for p, _, _ in PAIRS]
    assert held.responses == ["positive"] * 2 and held.rejected == ["negative"] * 2
    assert held.choices == [["negative", "positive"]] * 2


def test_dp_per_pair_gradients_with_dropout_are_each_pair_alone(tiny_chat_llama_dir, tok, pairs_file):
    # Prepare: --lora-dropout 0.3, the pairs with their references (computed without dropout), q = 1
    fm = _fm(tiny_chat_llama_dir, dropout=0.3)
    data, task = _encoded(tok, fm, pairs_file, _cfg()), get_task("dpo")
    # Execute / Assert: each pair's gradient, both its rows through their own masks
    ours, keys = fedlora_per_example(fm, data, len(PAIRS), task, q=1.0)
    assert len(ours) == len(PAIRS)
    assert_alone(fm, data, ours, keys, task)
