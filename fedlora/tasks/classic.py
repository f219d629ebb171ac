"""Sequence classification (a head on the model) and causal language modelling (every token)."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlora.data.loading import TextDataset, load_dataset
from fedlora.kernels import Routing
from fedlora.tasks.base import TRAIN, Task, TokenLossTask, gather_rows, register_task, token_losses


def columns(cfg, role: str = TRAIN) -> tuple[str, str]:
    """``(text column, label column)`` of the file ``role`` names: ``--data``'s, or those of
    ``--test-data`` / ``--init-data`` where their own flags name them (default: ``--data``'s)."""
    field = role.replace("-", "_")
    return (role and getattr(cfg, f"{field}text_column", "") or cfg.text_column,
            role and getattr(cfg, f"{field}label_column", "") or cfg.label_column)


#: A long text is cut at a space this many characters per token of ``max_length`` in, before it is
#: tokenized: far past where truncation ends (a token of English text averages 4-5 characters).
CUT_CHARS_PER_TOKEN = 16
KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _encode(tokenizer, texts: list[str], max_length: int, second: list[str] | None = None
            ) -> dict[str, Tensor]:
    enc = tokenizer(texts, second, truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="pt")
    return {k: v for k, v in enc.items() if k in KEYS}


def _cut(text: str, chars: int) -> str:
    """``text`` up to the last space before ``chars`` characters (all of it when shorter)."""
    if len(text) <= chars:
        return text
    space = text.rfind(" ", 0, chars)
    return text[:space] if space > 0 else text


def tokenize_texts(tokenizer, texts: list[str], max_length: int, second: list[str] | None = None
                   ) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` (and ``token_type_ids``), right-padded to ``max_length``;
    with ``second``, each text and its second as the tokenizer encodes a pair (``[CLS] a [SEP] b
    [SEP]`` for BERT, the longer one truncated first), whole.

    The same tensors as tokenizing the whole texts with right truncation, faster on long texts
    (a news article is about 100 times ``--max-length 32``): each text is first cut at a space
    ``CUT_CHARS_PER_TOKEN × max_length`` characters in. A row its cut text does not fill is encoded
    again from the whole text, and the cut rows are checked against the whole texts on a sample;
    a tokenizer that differs there (or truncates on the left) encodes every whole text.
    """
    if second is not None:
        return _encode(tokenizer, texts, max_length, second)
    chars = CUT_CHARS_PER_TOKEN * max_length
    cut = [_cut(t, chars) for t in texts]
    rows = [i for i, (a, b) in enumerate(zip(texts, cut, strict=True)) if len(b) < len(a)]  # cut
    if not rows or getattr(tokenizer, "truncation_side", "right") != "right":
        return _encode(tokenizer, texts, max_length)
    out = _encode(tokenizer, cut, max_length)
    if "attention_mask" not in out:
        return _encode(tokenizer, texts, max_length)
    filled = out["attention_mask"].sum(dim=1) >= max_length                     # (rows,)
    short = [i for i in rows if not filled[i]]
    sample = [i for i in rows if filled[i]][:4]
    redo = short + sample
    whole = _encode(tokenizer, [texts[i] for i in redo], max_length)
    if any(not torch.equal(whole[k][len(short):], out[k][sample]) for k in out):
        return _encode(tokenizer, texts, max_length)
    for k in out:
        out[k][short] = whole[k][:len(short)]
    return out


def tokenize_inputs(tokenizer, ds: TextDataset, max_length: int) -> dict[str, Tensor]:
    """A classifier's inputs of ``ds`` (:func:`tokenize_texts`): a pair of texts as the tokenizer
    encodes one where it separates them (BERT's ``[SEP]``); a tokenizer without a separator (GPT-2's,
    LLaMA's) would butt the second text onto the first, so it reads them as one text."""
    apart = ds.second is not None and getattr(tokenizer, "sep_token", None) is not None
    texts = ds.texts if apart or ds.second is None else ds.joined()
    return tokenize_texts(tokenizer, texts, max_length, ds.second if apart else None)


def class_scores(confusion: Tensor | None) -> dict[str, float]:
    """``macro_f1``, ``balanced_accuracy`` and ``mcc`` of a confusion matrix (``confusion[y, ŷ]``:
    examples of class y predicted ŷ), over the classes that are a label or a prediction
    (scikit-learn's)::

        F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)          macro_f1 = mean_c F1_c
        recall_c = TP_c / (TP_c + FN_c)                  balanced_accuracy = mean over labels c
        mcc = (c·s − Σ_k p_k t_k) / √((s² − Σ_k p_k²)(s² − Σ_k t_k²))

    where s is the examples, c the correct ones, t_k the labels k and p_k the predictions k: the
    Matthews correlation (Gorodkin's multi-class form; CoLA's GLUE metric), 0 where the predictions
    or the labels are all one class. A skewed federation's model that predicts one class scores
    1/classes in balanced accuracy and 0 in mcc, whatever the test set's class mix; plain accuracy
    does not tell it from a weak model."""
    if confusion is None or not int(confusion.sum()):
        return {}
    c = confusion.double()
    tp, labelled, predicted = c.diagonal(), c.sum(dim=1), c.sum(dim=0)
    seen = (labelled + predicted) > 0
    f1 = 2 * tp[seen] / (labelled[seen] + predicted[seen])
    recall = tp[labelled > 0] / labelled[labelled > 0]
    s = c.sum()
    spread = (s * s - (predicted * predicted).sum()) * (s * s - (labelled * labelled).sum())
    mcc = (tp.sum() * s - (predicted * labelled).sum()) / spread.sqrt() if spread > 0 else c.new_zeros(())
    return {"macro_f1": float(f1.mean()), "balanced_accuracy": float(recall.mean()), "mcc": float(mcc)}


def eval_batches(fm, data: dict[str, Tensor], cfg):
    """``(batch without labels, labels, logits)`` of slot 0, batch by batch, without gradients
    (each batch padded to its longest row unless ``--padding max-length``)."""
    device = next(fm.parameters()).device
    n = data["labels"].shape[0]
    for start in range(0, n, cfg.eval_batch_size):
        batch = gather_rows(data, list(range(start, min(n, start + cfg.eval_batch_size))), device,
                            cfg.padding == "longest")
        labels = batch.pop("labels")
        routing = Routing.segments(torch.zeros(1, dtype=torch.long, device=device), labels.shape[0])
        with torch.no_grad():
            yield batch, labels, fm(routing=routing, **batch).logits.float()


class HeadTask(Task):
    """A per-client head on the model's reading of a text or pair of texts (a classifier's, a
    regressor's): the examples' label column read as classes (``classes``) or else as scores, the
    texts encoded by :func:`tokenize_inputs`, and one loss term per example."""

    model_kind = "sequence-classification"
    peft_task_type = "SEQ_CLS"
    trains_head = True

    def load(self, spec: str, cfg, *, role: str = TRAIN) -> TextDataset:
        return load_dataset(spec, *columns(cfg, role), flags=role, scores=not self.classes)

    def encode(self, tokenizer, ds: TextDataset, cfg) -> dict[str, Tensor]:
        out = tokenize_inputs(tokenizer, ds, cfg.max_length)
        out["labels"] = self.label_tensor(ds)
        return out

    @abstractmethod
    def label_tensor(self, ds: TextDataset) -> Tensor:
        """``(N,)``: the examples' labels as the loss reads them."""

    def loss_counts(self, labels: Tensor) -> Tensor:
        return torch.ones(labels.shape[0], device=labels.device)


@register_task
class Classification(HeadTask):
    """Sequence classification: cross-entropy of a per-client head; accuracy per example."""

    name = "classification"
    classes = True

    def label_tensor(self, ds: TextDataset) -> Tensor:
        return torch.tensor(ds.labels, dtype=torch.long)

    def head_outputs(self, num_labels: int) -> int:
        return num_labels

    def loss_sums(self, logits: Tensor, labels: Tensor, positions: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def evaluate(self, fm, data: dict[str, Tensor], cfg) -> dict[str, float]:
        """``accuracy``, ``loss`` (mean cross-entropy), and from the confusion counts ``macro_f1``,
        ``balanced_accuracy`` and ``mcc`` (:func:`class_scores`)."""
        loss, confusion = 0.0, None
        for _, labels, logits in eval_batches(fm, data, cfg):
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            k = logits.shape[-1]
            counts = torch.bincount(labels.cpu() * k + logits.argmax(-1).cpu(), minlength=k * k).view(k, k)
            confusion = counts if confusion is None else confusion + counts
        n = max(int(data["labels"].shape[0]), 1)
        correct = 0 if confusion is None else int(confusion.diagonal().sum())
        return {"accuracy": correct / n, "loss": loss / n, **class_scores(confusion),
                "eval_examples": int(data["labels"].shape[0])}


@register_task
class CausalLM(TokenLossTask):
    """Language modelling of whole texts: loss on every token; accuracy per predicted token."""

    name = "causal-lm"
    metric = "token_accuracy"

    def load(self, spec: str, cfg, *, role: str = TRAIN) -> TextDataset:
        ds = load_dataset(spec, columns(cfg, role)[0], None, flags=role)
        return replace(ds, texts=ds.joined(), second=None)    # a pair of texts (a+b): one text

    def encode(self, tokenizer, ds: TextDataset, cfg) -> dict[str, Tensor]:
        out = tokenize_texts(tokenizer, ds.texts, cfg.max_length)
        out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return out

    def evaluate(self, fm, data: dict[str, Tensor], cfg) -> dict[str, float]:
        correct = count = loss = 0.0
        for _, labels, logits in eval_batches(fm, data, cfg):
            tok, valid = token_losses(logits, labels)
            hit = (logits[:, :-1].argmax(-1) == labels[:, 1:]).float() * valid
            loss += (tok * valid).sum().item()
            correct += hit.sum().item()
            count += valid.sum().item()
        count = max(count, 1.0)
        return {"accuracy": correct / count, "token_accuracy": correct / count, "loss": loss / count,
                "eval_examples": int(data["labels"].shape[0])}
