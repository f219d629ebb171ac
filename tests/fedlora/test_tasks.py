"""Task objects: collation with dynamic padding, losses, and the sft encoding and evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from fedlora.data.loading import TextDataset
from fedlora.data.preferences import PairDataset
from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.tasks import TASKS, TEST, gather_rows, get_task, length_groups, normalize


def test_every_task_is_registered_once():
    assert sorted(TASKS) == ["causal-lm", "classification", "dpo", "regression", "sft"]
    assert get_task("sft").peft_task_type == "CAUSAL_LM" and get_task("classification").trains_head
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        get_task("qa")


def test_gather_rows_cuts_columns_after_the_longest_row():
    # rows of 2, 5 and 3 tokens right-padded to 8; labels per row (1-D) and per token (2-D)
    mask = torch.tensor([[1] * n + [0] * (8 - n) for n in (2, 5, 3)])
    data = {"input_ids": torch.arange(24).view(3, 8), "attention_mask": mask,
            "labels": torch.tensor([7, 8, 9]), "token_labels": torch.arange(24).view(3, 8)}
    batch = gather_rows(data, [2, 0], torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[16, 17, 18], [0, 1, 2]]   # width 3: the longer row
    assert batch["token_labels"].shape == (2, 3) and batch["labels"].tolist() == [9, 7]
    fixed = gather_rows(data, [2, 0], torch.device("cpu"), pad_to_longest=False)
    assert fixed["input_ids"].shape == (2, 8)


def test_length_groups_by_hand():
    # 8 rows: one pass costs 8 x 50 = 400 padded tokens. Sorted, 4 groups cost
    # 2·2 + 2·3 + 2·5 + 2·50 = 120, priced 1.3x = 156, the cheapest G (G=3: 166·1.2 = 199.2;
    # G=5: 121·1.4 = 169.4; G=8: 114·1.7 = 193.8)
    lengths = torch.tensor([2, 50, 3, 4, 45, 5, 2, 3])
    groups = length_groups(lengths)
    assert [g.tolist() for g in groups] == [[0, 6], [2, 7], [3, 5], [4, 1]]
    assert length_groups(torch.full((8,), 64)) is None        # equal lengths: one pass
    assert length_groups(torch.tensor([10, 12, 11, 13])) is None  # similar lengths: one pass


def test_losses_by_hand():
    cls, lm = get_task("classification"), get_task("causal-lm")
    # two segments of two rows; logits make row losses log(2), log(2), 0-ish, 0-ish
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    labels = torch.tensor([0, 1, 0, 1])
    assert torch.allclose(cls.client_losses(logits, labels, 2), torch.tensor([math.log(2), 0.0]), atol=1e-6)
    # causal LM: uniform logits over 4 tokens; row 0 has 2 labeled next tokens, row 1 has 1
    lg = torch.zeros(2, 3, 4)
    lb = torch.tensor([[-100, 1, 2], [-100, -100, 3]])
    assert torch.allclose(lm.row_losses(lg, lb), torch.full((2,), math.log(4)))
    assert torch.allclose(lm.client_losses(lg, lb, 1), torch.tensor([math.log(4)]))


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_chat_llama_dir)


def _sft(**kw) -> JobConfig:
    return JobConfig(task="sft", model="unused", **{"max_length": 32, **kw})


def test_sft_rows_learn_only_the_response(chat_tok):
    ds = TextDataset(["great film", "dull"], [1, 0], ["0", "1"], ["positive", "negative"])
    data = get_task("sft").encode(chat_tok, ds, _sft())
    ids, labels, mask = data["input_ids"][0], data["labels"][0], data["attention_mask"][0]
    prompt = chat_tok("user: great film [SEP] assistant:", add_special_tokens=False)["input_ids"]
    completion = chat_tok("positive [SEP]", add_special_tokens=False)["input_ids"]
    n = len(prompt) + len(completion)
    assert ids[:n].tolist() == prompt + completion and int(mask.sum()) == n
    assert labels[len(prompt):n].tolist() == completion                      # the response and [SEP]
    assert (labels[:len(prompt)] == -100).all() and (labels[n:] == -100).all()


def test_sft_cuts_long_prompts_from_the_left_and_refuses_long_responses(chat_tok, capsys):
    long = " ".join(["word"] * 40)
    ds = TextDataset([long, "short"], None, [], ["yes", "no"])
    data = get_task("sft").encode(chat_tok, ds, _sft(max_length=16))
    row = data["input_ids"][0].tolist()
    completion = chat_tok("yes [SEP]", add_special_tokens=False)["input_ids"]
    assert int(data["attention_mask"][0].sum()) == 16 and row[16 - len(completion):16] == completion
    assert chat_tok.decode(row[:3]) == "word word word"                     # the start was cut
    assert "1 of 2 sft examples exceed --max-length 16" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"1 of 1 training responses alone have --max-length 4 tokens or more"
                       r" \(the longest has 7\).*; pass a --max-length above 7"):
        get_task("sft").encode(chat_tok, TextDataset(["q"], None, [], ["a b c d e f"]), _sft(max_length=4))
    # a response of --max-length tokens exactly trained from an empty prompt: refused too
    with pytest.raises(UserError, match=r"1 of 1 training responses alone have --max-length 7 tokens or more"
                       r" \(the longest has 7\), which leaves their prompts no token; pass a --max-length"
                       r" above 7"):
        get_task("sft").encode(chat_tok, TextDataset(["q"], None, [], ["a b c d e f"]), _sft(max_length=7))
    assert get_task("sft").encode(chat_tok, TextDataset(["q"], None, [], ["a b c d e f"]),
                                  _sft(max_length=8))["labels"][0].tolist()[0] == -100     # one prompt token


def test_sft_needs_a_chat_template_or_plain(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)  # MiniLM's tokenizer: no chat template
    ds = TextDataset(["hi"], None, [], ["hello"])
    with pytest.raises(UserError, match="no chat template.*--chat-template plain"):
        get_task("sft").encode(tok, ds, _sft())
    tok.eos_token = "[SEP]"
    prompts, completions = get_task("sft").pieces(tok, ds, _sft(chat_template="plain"))
    assert tok.decode(prompts[0]) == "hi" and tok.decode(completions[0]) == "hello [SEP]"


def test_plain_prompts_lead_with_the_bos_token_where_the_tokenizer_puts_one_before_every_text(tiny_llama_dir):
    # Prepare: MiniLM's tokenizer puts [CLS] before every text: as its beginning-of-text token, the
    # way LLaMA's and Gemma's tokenizers put <s> / <bos> (examples are encoded without special tokens)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.eos_token, tok.bos_token = "[SEP]", "[CLS]"
    ds = TextDataset(["hi", "hello there"], None, [], ["hello", "hi"])
    # Execute
    prompts, completions = get_task("sft").pieces(tok, ds, _sft(chat_template="plain"))
    # Assert: each prompt starts with exactly one [CLS]; the completions are as before
    assert [p[:2] for p in prompts] == [[tok.cls_token_id, tok.convert_tokens_to_ids("hi")],
                                        [tok.cls_token_id, tok.convert_tokens_to_ids("hello")]]
    assert tok.decode(prompts[1]) == "[CLS] hello there" and tok.decode(completions[0]) == "hello [SEP]"


#: Qwen3's thinking switch, in plain words for MiniLM's tokenizer: the last assistant turn opens with an
#: empty thinking block, and a generation prompt ends with one when ``enable_thinking`` is false.
THINKING = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' and loop.last %}"
            "think none end {% endif %}{{ m['content'] }} [SEP] {% endfor %}{% if add_generation_prompt %}"
            "assistant: {% if enable_thinking is defined and enable_thinking is false %}think none end "
            "{% endif %}{% endif %}")


def test_a_template_with_a_thinking_switch_is_rendered_with_it_off(tiny_llama_dir):
    # Prepare: a template like Qwen3's; without the switch its completion would start with the
    # empty thinking block, which the model would learn to write and exact match would then fail
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template, tok.eos_token = THINKING, "[SEP]"
    ds = TextDataset(["great film"], None, [], ["positive"])
    # Execute
    prompts, completions = get_task("sft").pieces(tok, ds, _sft())
    # Assert: the empty block ends the prompt; the completion is the answer and the end of the turn
    assert tok.decode(prompts[0]) == "user : great film [SEP] assistant : think none end"
    assert tok.decode(completions[0]) == "positive [SEP]"
    # a template whose switch changes only the generation prompt (the answer's turn renders without the
    # block, as SmolLM3's no-think mode may) renders as it is, not refused
    tok.chat_template = THINKING.replace("{% if m['role'] == 'assistant' and loop.last %}"
                                         "think none end {% endif %}", "")
    prompts, completions = get_task("sft").pieces(tok, ds, _sft())
    assert tok.decode(prompts[0]) == "user : great film [SEP] assistant :"
    assert tok.decode(completions[0]) == "positive [SEP]"


def test_greedy_answers_stop_at_the_templates_end_of_turn_too(tiny_llama_dir):
    # Prepare: turns that end with [MASK], a special token that is not the end of text ([SEP]), as
    # Gemma's <end_of_turn> is not its <eos>
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = CHAT_MASK
    tok.eos_token = "[SEP]"
    ds = TextDataset(["great film", "dull plot"], None, [], ["positive", "negative"])
    # Execute
    data = get_task("sft").generation_set(tok, ds, _sft())
    # Assert: the answers stop at either; each completion is its answer and the end of turn
    assert data.stop_ids == sorted([tok.sep_token_id, tok.mask_token_id])
    assert sorted(tok.decode(c) for c in data.completions) == ["negative [MASK]", "positive [MASK]"]
    # and at the model config's and generation config's ends of text (one id, or a list: Gemma's)
    from types import SimpleNamespace

    from fedlora.tasks.sft import _stop_ids

    configs = SimpleNamespace(eos_token_id=7), SimpleNamespace(eos_token_id=[1, 106])
    assert _stop_ids(tok, *configs) == sorted([1, 7, 106, tok.sep_token_id])


#: Turns that end with [MASK] (MiniLM's tokenizer has no end-of-turn token of its own).
CHAT_MASK = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [MASK] {% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}")


#: Gemma's rule: no system role, and user/assistant turns alternate (in plain words for MiniLM's tokenizer).
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
             "{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}")


def test_a_template_without_a_system_role_gets_it_in_the_first_user_turn_said_once(tiny_llama_dir, capsys):
    # Prepare: a tokenizer whose template refuses system messages, and --system-prompt
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template, tok.eos_token = NO_SYSTEM, "[SEP]"
    ds = TextDataset(["great film"], None, [], ["positive"])
    cfg = _sft(system_prompt="Answer in one word.")
    # Execute: twice, as a job renders its training and held-out examples
    first = get_task("sft").pieces(tok, ds, cfg)
    second = get_task("sft").pieces(tok, ds, cfg)
    # Assert: the system prompt opens the user's turn; one line said it
    prompt = tok.decode(first[0][0])
    assert prompt == "user : answer in one word. great film [SEP] assistant :" and second == first
    assert capsys.readouterr().err.count("takes no system message") == 1
    # roles that break the template otherwise are refused in one line
    turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(UserError, match=r"^the chat template refuses the messages of roles user user"
                                        r" .*\(Conversation roles must alternate\), starting 'a': fix the"
                                        r" data's roles"):
        get_task("sft").pieces(tok, TextDataset([turns], None, [], ["c"]), _sft())


def test_normalize_compares_answers_not_formatting():
    assert normalize("  Positive.\n") == "positive" == normalize('"positive"')
    assert normalize("very  Positive!") == "very positive" != normalize("positive")


def _adapted_chat_model(path):
    from transformers import AutoModelForCausalLM

    from fedlora.models.model import AdapterConfig, FederatedModel
    from fedlora.models.state import apply_global
    from fedlora.strategies import GlobalState

    fm = FederatedModel(AutoModelForCausalLM.from_pretrained(path),
                        AdapterConfig(ranks=[4], alpha=8.0, target_modules=["all-linear"], train_head=False))
    g = torch.Generator().manual_seed(5)
    factors = {n: (torch.randn(4, m.lora_A.shape[2], generator=g),
                   torch.randn(m.lora_B.shape[1], 4, generator=g)) for n, m in fm.adapters.items()}
    apply_global(fm, GlobalState(factors=factors, scale=2.0), {})
    return fm


def test_shared_prefill_scoring_equals_generate_and_teacher_forcing(tiny_chat_llama_dir, chat_tok):
    # Prepare: prompts of different lengths (left padding matters), references of 1-3 tokens
    from fedlora.tasks.base import token_losses
    from fedlora.tasks.decode import score_and_generate

    fm = _adapted_chat_model(tiny_chat_llama_dir)
    texts = ["great", "a rather long and winding review of a film", "dull plot twist"]
    prompts = [chat_tok(f"user: {t} [SEP] assistant:", add_special_tokens=False)["input_ids"]
               for t in texts]
    completions = [chat_tok(c, add_special_tokens=False)["input_ids"]
                   for c in ("yes [SEP]", "no", "so so [SEP]")]
    stop = [chat_tok.sep_token_id]
    # Execute
    nll, count, greedy = score_and_generate(fm, prompts, completions, 6, stop, chat_tok.pad_token_id)
    # Assert 1: greedy tokens are transformers' generate, row by row, cut before the stop token
    for p, got in zip(prompts, greedy, strict=True):
        mask = torch.ones(1, len(p), dtype=torch.long)
        want = fm.generate(input_ids=torch.tensor([p]), attention_mask=mask, max_new_tokens=6,
                           do_sample=False, eos_token_id=stop,
                           pad_token_id=chat_tok.pad_token_id)[0, len(p):].tolist()
        assert got == (want[:want.index(stop[0])] if stop[0] in want else want)
    # Assert 2: nll is the summed loss of each reference under a teacher-forced pass of the whole row
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.tensor([p + c])
        labels = torch.tensor([[-100] * len(p) + c])
        tok, valid = token_losses(fm(input_ids=ids).logits, labels)
        assert float(nll[i]) == pytest.approx(float((tok * valid).sum()), rel=1e-5)
        assert int(count[i]) == len(c)


def test_sft_evaluate_counts_normalized_answers(tiny_chat_llama_dir, chat_tok, monkeypatch):
    # Prepare: three references; the model's greedy answers are replaced by known strings
    import math as m

    from fedlora.tasks import sft as sft_module

    task = get_task("sft")
    ds = TextDataset(["a", "b", "c"], None, [], ["positive", "negative", "positive"])
    data = task.eval_set(chat_tok, ds, _sft())

    def fake(fm, prompts, completions, max_new, stops, pad):
        greedy = [chat_tok("Positive.", add_special_tokens=False)["input_ids"],
                  chat_tok("the sentiment", add_special_tokens=False)["input_ids"],
                  chat_tok("positive", add_special_tokens=False)["input_ids"]]
        return torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2, 2, 2]), greedy

    monkeypatch.setattr(sft_module, "score_and_generate", fake)
    # Execute
    got = task.evaluate(_adapted_chat_model(tiny_chat_llama_dir), data, _sft(eval_batch_size=8))
    # Assert: 2 of 3 answers match after normalization; loss = 6 nats over 6 reference tokens
    assert got["answer_accuracy"] == pytest.approx(2 / 3) and got["accuracy"] == got["answer_accuracy"]
    assert got["loss"] == pytest.approx(1.0) and got["perplexity"] == pytest.approx(m.e)
    assert got["eval_examples"] == 3
    assert "answer_balanced_accuracy" not in got  # free-form references: no classes to balance


def test_sft_evaluate_balances_closed_set_answers(tiny_chat_llama_dir, chat_tok, monkeypatch):
    # Prepare: label-word data (3 positive, 1 negative) and a model that answers "positive" to all
    from fedlora.tasks import sft as sft_module

    words = ["positive", "negative"]
    ds = TextDataset(["a", "b", "c", "d"], [1, 1, 1, 0], words, ["positive"] * 3 + ["negative"], [words] * 4)
    data = get_task("sft").eval_set(chat_tok, ds, _sft())
    said = chat_tok("positive", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(sft_module, "score_and_generate", lambda fm, prompts, *a: (
        torch.ones(len(prompts)), torch.ones(len(prompts), dtype=torch.long), [said] * len(prompts)))
    # Execute
    got = get_task("sft").evaluate(_adapted_chat_model(tiny_chat_llama_dir), data, _sft(eval_batch_size=8))
    # Assert: 3 of 4 right, but per class 3/3 and 0/1: balanced (1 + 0) / 2
    assert got["answer_accuracy"] == pytest.approx(3 / 4)
    assert got["answer_balanced_accuracy"] == pytest.approx(1 / 2)


def test_logit_positions_are_those_before_a_labeled_token():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    sft = get_task("sft")
    assert sft.logit_positions(labels).tolist() == [0, 1, 2]     # predict tokens 1, 2, 3
    assert get_task("classification").logit_positions(torch.tensor([0, 1])) is None
    # the loss from those positions' logits equals the loss from every position's
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    keep = sft.logit_positions(labels)
    assert torch.allclose(sft.loss_sums(logits[:, keep], labels, keep), sft.loss_sums(logits, labels))


def test_training_on_response_logits_only_equals_all_logits(tiny_chat_llama_dir, chat_tok, monkeypatch):
    # Prepare: sft rows of different lengths, two clients in one pass
    import copy

    from transformers import AutoModelForCausalLM

    from fedlora.models.model import AdapterConfig, FederatedModel
    from fedlora.models.state import extract_upload
    from fedlora.training.train import ClientSampler, TrainConfig, train_clients

    task = get_task("sft")
    texts = [" ".join(["word"] * (i % 7 + 1)) for i in range(16)]
    ds = TextDataset(texts, None, [], ["positive" if i % 2 else "negative" for i in range(16)])
    data = task.encode(chat_tok, ds, _sft())
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)
    cfg = TrainConfig(task=task, local_steps=3, batch_size=4, lr=1e-2)
    ups = []
    for keep in (True, False):
        if not keep:  # every position's logits, as before the loss's positions were known
            monkeypatch.setattr(type(task), "logit_positions", lambda self, labels: None)
        fm = FederatedModel(copy.deepcopy(base), AdapterConfig(ranks=[4, 4], alpha=8.0, train_head=False))
        fm.reset_adapters(0)
        # Execute
        train_clients(fm, data, [ClientSampler(range(0, 8), 0), ClientSampler(range(8, 16), 1)], cfg)
        ups.append([extract_upload(fm, k, 8) for k in range(2)])
    # Assert: the same adapters
    for k in range(2):
        for layer, (A, B) in ups[0][k].factors.items():
            A1, B1 = ups[1][k].factors[layer]
            assert torch.allclose(A, A1, atol=1e-6) and torch.allclose(B, B1, atol=1e-6)
            assert B.abs().sum() > 0


def test_held_out_rows_whose_response_cannot_fit_are_skipped_with_one_warning(chat_tok, capsys):
    # Prepare: "yes [SEP]" is 2 tokens; "a b c d e f [SEP]" 7, more than --max-length 4 alone
    sft = get_task("sft")
    ds = TextDataset(["q1", "q2"], None, [], ["yes", "a b c d e f"])
    cfg = _sft(max_length=4, test_data="held.jsonl")
    # Execute
    data = sft.eval_set(chat_tok, ds, cfg)
    # Assert: the row is not scored (before: the whole job was refused, "raise --max-length")
    assert data.answers == ["yes"]
    err = capsys.readouterr().err
    assert ("fedlora: 1 of 2 held-out examples (--test-data held.jsonl) have a response of --max-length"
            " 4 tokens or more alone (the longest has 7 tokens), which leaves no token of the prompt; they"
            " are not scored") in err
    with pytest.raises(UserError, match=r"every held-out example \(1, --test-data held.jsonl\) has a response"
                       r" of --max-length 4 tokens or more alone \(the longest has 7 tokens\)"):
        sft.eval_set(chat_tok, ds.subset([1]), cfg)


def test_a_held_out_response_as_long_as_max_length_is_not_scored_without_its_prompt(chat_tok, capsys):
    # Prepare: "a b c [SEP]" is 4 tokens, all of --max-length 4: its prompt would be cut to no token,
    # and the reference and the answer scored from a pad position (a model asked nothing)
    sft = get_task("sft")
    ds = TextDataset(["q1", "q2"], None, [], ["yes", "a b c"])
    cfg = _sft(max_length=4, test_data="held.jsonl")
    # Execute
    data = sft.eval_set(chat_tok, ds, cfg)
    # Assert: every scored prompt keeps a token; the row is skipped with the warning
    assert data.answers == ["yes"] and min(len(p) for p in data.prompts) > 0
    assert ("fedlora: 1 of 2 held-out examples (--test-data held.jsonl) have a response of --max-length"
            " 4 tokens or more alone (the longest has 4 tokens), which leaves no token of the prompt; they"
            " are not scored") in capsys.readouterr().err


def test_held_out_pairs_with_a_response_too_long_are_skipped(chat_tok, capsys):
    dpo = get_task("dpo")
    ds = PairDataset(["q1", "q2"], None, [], ["yes", "no"], None, ["no", "a b c d e f"])
    data = dpo.eval_set(chat_tok, ds, JobConfig(task="dpo", model="unused", max_length=4))
    assert data.pairs["input_ids"].shape[0] == 1
    assert "1 of 2 held-out examples (the held-out split of --data) have a response (chosen or rejected)" in (
        capsys.readouterr().err)


def test_a_labeled_test_files_choices_hold_the_training_labels(tmp_path):
    # Prepare: training rows of labels 0 and 1, a held-out file of label 1 only
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\nbad,0\ngood,1\n")
    test.write_text("text,label\nfine,1\nnice,1\n")
    sft = get_task("sft")
    # Execute / Assert: with label words, every word; without, every training label (the label itself)
    cfg = _sft(data=str(train), test_data=str(test), prompt_template="S? {text}", label_words="0=neg,1=pos")
    held = sft.load(str(test), cfg, role=TEST)
    assert held.choices == [["neg", "pos"]] * 2 and held.labels == [1, 1] and held.responses == ["pos"] * 2
    cfg = _sft(data=str(train), test_data=str(test), prompt_template="S? {text}")
    held = sft.load(str(test), cfg, role=TEST)
    assert held.choices == [["0", "1"]] * 2 and held.labels == [1, 1] and held.responses == ["1", "1"]


def test_sft_reads_a_passage_and_its_question_as_one_prompt(tmp_path):
    # BoolQ: passage, question, answer; the prompt holds both
    path = tmp_path / "boolq.jsonl"
    path.write_text('{"passage": "Cats sleep a lot.", "question": "do cats sleep", "answer": true}\n'
                    '{"passage": "Fish swim.", "question": "do fish fly", "answer": false}\n')
    cfg = _sft(text_column="passage+question", label_column="answer", label_words="True=yes,False=no",
               prompt_template="{text}?")
    ds = get_task("sft").load(str(path), cfg)
    assert ds.texts == ["Cats sleep a lot.\n\ndo cats sleep?", "Fish swim.\n\ndo fish fly?"]
    assert ds.responses == ["yes", "no"]
