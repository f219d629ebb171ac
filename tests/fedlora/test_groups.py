"""``--partition-column``: clients split by a column of the data file (fedlora/data/groups.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fedlora.data.loading import partition
from fedlora.errors import UserError
from fedlora.job.checks import check_job_args
from fedlora.job.schema import JobConfig
from fedlora.job.setup import check_inputs, client_share, training_data

SITES = ["b", "a", "c"]


@pytest.fixture
def sites_csv(tmp_path):
    """60 labeled rows; row i is from site SITES[i % 3] and its text names its row."""
    lines = ["text,label,site"] + [f"row {i} {'red' if i % 2 else 'blue'},{i % 2},{SITES[i % 3]}"
                                   for i in range(60)]
    path = tmp_path / "sites.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _row(text) -> int:
    return int((text if isinstance(text, str) else text[-1]["content"]).split()[1])


def test_natural_gives_each_value_its_own_client_numbered_by_value(sites_csv):
    # Prepare
    cfg = JobConfig(data=str(sites_csv), partition="natural", partition_column="site", num_clients=3)
    # Execute: what a deployed client and the simulator's partition hold
    shares = [client_share(cfg, k, 3) for k in range(3)]
    parts = partition(training_data(cfg), 3, "natural", cfg.alpha, cfg.seed)
    # Assert: client k holds exactly the training rows of the k-th site in sorted order (a, b, c)
    train = training_data(cfg)
    for k, site in enumerate(sorted(SITES)):
        want = sorted(_row(t) for t in train.texts if SITES[_row(t) % 3] == site)
        assert sorted(_row(t) for t in shares[k].texts) == want and set(shares[k].groups) == {site}
        assert sorted(_row(train.texts[i]) for i in parts[k]) == want
    assert sum(len(s) for s in shares) == len(train) == 48  # the other 12 are held out


def test_dirichlet_splits_free_form_instructions_by_a_column(tmp_path):
    # Prepare: Dolly-like rows without labels (dirichlet by the labels was refused), four categories
    cats = ["open_qa", "brainstorming", "summarization", "classification"]
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q {i}", "context": "", "response": f"a {i}",
                                        "category": cats[i % 4]}) + "\n" for i in range(200)))
    cfg = JobConfig(task="sft", data=str(path), partition="dirichlet", partition_column="category",
                    num_clients=4, alpha=0.1, max_length=32)
    train = training_data(cfg)
    # the same rows labeled by their category, in the categories' sorted order
    labeled = replace(train, labels=[sorted(cats).index(g) for g in train.groups], label_names=sorted(cats),
                      groups=None)
    # Execute
    parts = partition(train, 4, "dirichlet", 0.1, cfg.seed)
    shares = [client_share(cfg, k, 4) for k in range(4)]
    # Assert: the categories split as labels would be; every example once, each with its row's category;
    # the mixes skewed (a client's largest category is over half its rows)
    assert parts == partition(labeled, 4, "dirichlet", 0.1, cfg.seed)
    assert sorted(_row(t) for s in shares for t in s.texts) == sorted(_row(t) for t in train.texts)
    for share in shares:
        assert all(g == cats[_row(t) % 4] for t, g in zip(share.texts, share.groups, strict=True))
    assert max(max(s.groups.count(c) for c in cats) / len(s) for s in shares) > 0.5


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_rows_a_reader_skips_leave_every_example_its_own_rows_group(tmp_path, task):
    # Prepare: every 5th row is skipped (an empty response; a pair whose two responses are the same)
    path = tmp_path / "rows.jsonl"
    sft = [{"prompt": f"p {i}", "response": "" if i % 5 == 0 else f"r {i}", "user": f"u{i % 4}"}
           for i in range(40)]
    dpo = [{"prompt": f"p {i}", "chosen": f"c {i}", "rejected": f"c {i}" if i % 5 == 0 else f"x {i}",
            "user": f"u{i % 4}"} for i in range(40)]
    rows = sft if task == "sft" else dpo
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = JobConfig(task=task, data=str(path), partition="natural", partition_column="user", num_clients=4,
                    max_length=32)
    # Execute
    shares = [client_share(cfg, k, 4) for k in range(4)]
    # Assert: client k holds the rows of user uk, none of them skipped rows
    for k, share in enumerate(shares):
        assert share.texts and all(_row(t) % 4 == k and _row(t) % 5 for t in share.texts)


def test_bad_partition_columns_are_refused_in_one_line(sites_csv, tmp_path):
    blank = tmp_path / "blank.csv"
    blank.write_text("text,label,site\nx red,1,a\ny blue,0,\n" + "".join(f"z{i} red,1,b\n" for i in range(8)))
    cases = [
        (dict(partition="natural"), "--partition natural gives each value of a data column its own client"),
        (dict(partition_column="site"), "--partition iid reads no column"),
        (dict(partition="natural", partition_column="site", num_clients=4),
         "the training rows have 3 values of --partition-column (a, b, c), a client each: pass"
         " --num-clients 3"),
        (dict(partition="dirichlet", partition_column="Site"),
         "sites.csv has no column 'Site' (columns: text,"),
        (dict(partition="dirichlet", partition_column="site", data="bbcnews"), "--data bbcnews is built in"),
        (dict(partition="dirichlet", partition_column="site", data=str(blank)),
         "1 row(s) of blank.csv have no 'site' (null, NaN or empty; the first is data row 2)"),
    ]
    for kw, message in cases:
        cfg = JobConfig(**{"data": str(sites_csv), "num_clients": 3, **kw})
        with pytest.raises(UserError, match=None) as exc:
            check_job_args(cfg)
            check_inputs(cfg)
        assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_server_with_more_clients_than_training_rows_says_only_own_data_clients_can_join(tiny_csv, capsys):
    # fedlora-server could not tell before the start that clients on --partition-id would get no rows
    cfg = JobConfig(data=str(tiny_csv), num_clients=500, model="minilm")
    check_inputs(cfg)
    err = capsys.readouterr().err
    assert ("--num-clients 500 is more than the 144 training examples of --data" in err
            and "only clients on their own --data can take part" in err)
    check_inputs(JobConfig(data=str(tiny_csv), num_clients=10, model="minilm"))
    assert capsys.readouterr().err == ""
