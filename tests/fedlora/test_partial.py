"""--eval mc-partial: Winogrande's partial scoring equals each context scored directly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.errors import UserError
from fedlora.job.schema import JobConfig
from fedlora.models.model import AdapterConfig, FederatedModel
from fedlora.tasks import get_task

ROWS = [{"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
         "option2": "the table", "answer": "2"},
        {"sentence": "Ann lent Mary a pen because _ had two of them.", "option1": "Ann", "option2": "Mary",
         "answer": "1"}]


def _cfg(**kw) -> JobConfig:
    return JobConfig(task="sft", model="unused", **{"eval": "mc-partial", "max_length": 64,
                                                     "columns": "question=sentence,choices=option1+option2",
                                                     "eval_batch_size": 3, **kw})


@torch.no_grad()
def _direct(fm, prompt: list[int], target: list[int]) -> float:
    logp = torch.log_softmax(fm(input_ids=torch.tensor([prompt + target])).logits[0].float(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + t, c]) for t, c in enumerate(target))


def test_each_choice_fills_the_blank_and_the_shared_rest_is_scored(tiny_chat_llama_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    config = AdapterConfig(ranks=[4], alpha=8.0, target_modules=["all-linear"], train_head=False)
    model = FederatedModel(AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir), config)
    spec = tmp_path / "wino.jsonl"
    spec.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    task, cfg = get_task("sft"), _cfg()
    ds = task.load(str(spec), cfg)
    assert ds.labels == [1, 0]                                   # Winogrande's 1-based answers
    data = task.eval_set(tok, ds, cfg)
    # the contexts, as lm-eval builds them: the sentence up to the blank with the choice in it
    want = {}
    for i, row in enumerate(ROWS):
        blank = row["sentence"].index("_")
        target = tok(" " + row["sentence"][blank + 1:].strip(), add_special_tokens=False)["input_ids"]
        for j, option in enumerate((row["option1"], row["option2"])):
            context = tok(row["sentence"][:blank] + option, add_special_tokens=False)["input_ids"]
            want[i, j] = _direct(model, context, target)
            k = data.slots.index((i, j))
            assert (data.prompts[k], data.targets[k]) == (context, target)
    got = task.evaluate(model, data, cfg)
    right = sum(max(range(2), key=lambda j, i=i: want[i, j]) == a for i, a in enumerate(ds.labels))
    assert got["mc_accuracy"] == got["mc_accuracy_norm"] == right / 2 and got["eval_examples"] == 2
    nll = -(want[0, 1] + want[1, 0])
    lengths = sum(len(data.targets[data.slots.index((i, 0))]) for i in range(2))
    assert got["loss"] == pytest.approx(nll / lengths, rel=1e-5)


def test_a_question_without_a_blank_or_with_shots_is_refused(tiny_chat_llama_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    spec = tmp_path / "wino.jsonl"
    rows = [ROWS[0], {**ROWS[1], "sentence": "No blank here."}]
    spec.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("sft")
    with pytest.raises(UserError, match=r"^--eval mc-partial fills each choice into its question's blank '_'"
                                        r".*held-out question 2 has no blank"):
        task.eval_set(tok, task.load(str(spec), _cfg()), _cfg())
    with pytest.raises(UserError, match="take no --fewshot examples"):
        task.eval_set(tok, task.load(str(spec), _cfg()), _cfg(fewshot=1))
