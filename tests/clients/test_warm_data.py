"""A client rebuilt for each message (Flower's simulation engine, a restarted ClientApp) reads,
partitions and encodes its data once a process (``fedlora.job.warm``), never from a stale entry."""

from __future__ import annotations

import pytest
import torch

from fedlora.data.loading import TextDataset, partition, shares
from fedlora.job import setup, warm
from fedlora.job.schema import JobConfig
from fedlora.tasks import get_task
from fedlora.training import client as client_module
from fedlora.training.client import CLIENTS_KEPT, ClientData, LocalClient

LABELS = ["0", "1", "2"]


@pytest.fixture
def counted(monkeypatch):
    """Counts of reads of the job's training data and of the task's encodings; caches emptied."""
    warm.forget()
    calls = {"read": 0, "encode": 0}
    read, task = setup.training_data, get_task("classification")
    encode = type(task).encode

    def reading(cfg, task=None):
        calls["read"] += 1
        return read(cfg, task)

    def encoding(self, *args, **kw):
        calls["encode"] += 1
        return encode(self, *args, **kw)

    monkeypatch.setattr(setup, "training_data", reading)
    monkeypatch.setattr(type(task), "encode", encoding)
    yield calls
    warm.forget()


def job(model, data, **kw) -> JobConfig:
    return JobConfig(model=str(model), data=str(data), num_clients=4, max_length=16, batch_size=4,
                     rank=4, **kw)


def client(cfg: JobConfig, pid: int) -> LocalClient:
    return LocalClient(cfg, ClientData(pid, pid, cfg.num_clients), LABELS)


def test_clients_of_one_job_read_its_data_once(counted, tiny_bert_dir, tiny_csv):
    # Execute: partitions 0, 1 and 0 again (a Ray actor serving three messages of two nodes)
    cfg = job(tiny_bert_dir, tiny_csv, partition="dirichlet", alpha=1.0)
    first, _, again = client(cfg, 0), client(cfg, 1), client(cfg, 0)
    # Assert: one read of the file; client 0 encoded once, its examples the same tensors
    assert counted == {"read": 1, "encode": 2}
    assert again.train is first.train and len(again) == len(first)


def test_another_job_or_an_edited_file_is_read_again(counted, tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare: a copy of the data, to edit
    data = tmp_path / "rows.csv"
    data.write_text(tiny_csv.read_text())
    before = client(job(tiny_bert_dir, data), 0)
    # Execute: another seed; then the file cut to its first 40 rows, under the first job's settings
    client(job(tiny_bert_dir, data, seed=1), 0)
    data.write_text("".join(tiny_csv.read_text().splitlines(keepends=True)[:41]))
    after = client(job(tiny_bert_dir, data), 0)
    # Assert: each read afresh, and the edited file's share is a part of its 40 rows
    assert counted["read"] == 3
    assert len(after) <= 40 // 4 < len(before)


def test_a_client_rebuilt_from_kept_examples_trains_as_a_fresh_one(counted, tiny_bert_dir, tiny_csv):
    # Prepare: client 2 built once, so its examples are kept
    cfg = job(tiny_bert_dir, tiny_csv, local_steps=2, personal_test_fraction=0.25)
    fresh = client(cfg, 2).fit(1)[0]
    # Execute: rebuilt from what the process keeps
    kept = client(cfg, 2)
    # Assert: the same upload, bit for bit, from one encoding of its examples (train, then held out)
    assert counted["encode"] == 2 and kept.personal is not None
    up = kept.fit(1)[0]
    assert all(torch.equal(up[k], fresh[k]) for k in fresh)


def test_kept_examples_are_bounded(counted, monkeypatch, tiny_bert_dir, tiny_csv):
    # Prepare: a process that keeps two clients' examples
    monkeypatch.setattr(client_module._EXAMPLES, "size", 2)
    cfg = job(tiny_bert_dir, tiny_csv)
    # Execute: clients 0, 1, 2, then 0 again
    for pid in (0, 1, 2, 0):
        client(cfg, pid)
    # Assert: client 0's examples were dropped for client 2's, so encoded again; two kept
    assert counted["encode"] == 4 and len(client_module._EXAMPLES) == 2
    assert CLIENTS_KEPT >= 2


def test_recent_keeps_the_most_recently_used_entries():
    # Prepare: a map of two entries, counting what it makes
    made = []
    kept = warm.Recent(2)

    def make(key):
        return lambda: made.append(key) or key

    # Execute: a, b, a (used again), c (drops b, the least recently used), a, b
    got = [kept.get(k, make(k)) for k in "abacab"]
    # Assert: b was made twice, a once
    assert got == list("abacab") and made == ["a", "b", "c", "b"]
    warm.forget()
    assert len(kept) == 0


@pytest.mark.parametrize(("method", "alpha"), [("iid", 0.0), ("dirichlet", 1.0), ("dirichlet-clients", 0.5)])
def test_shares_drawn_once_are_the_partition(method, alpha):
    # Prepare: 60 examples of 3 labels
    ds = TextDataset([f"t{i}" for i in range(60)], [i % 3 for i in range(60)], LABELS)
    # Execute: one draw, read a client at a time
    share = shares(ds, 5, method, alpha, 0)
    # Assert: every client's indices as partition() gives them, in any order of reading
    assert [share([c])[0] for c in (4, 0, 3, 1, 2)] == [partition(ds, 5, method, alpha, 0, [c])[0]
                                                       for c in (4, 0, 3, 1, 2)]
