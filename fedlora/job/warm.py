"""What a process keeps between the messages of a run, bounded: a deployed or ``--engine flower``
client is rebuilt for many messages (a Ray actor of Flower's simulation serves many virtual nodes),
and each rebuild read, partitioned and encoded the whole ``--data`` file again.

* :class:`Recent`: a map that keeps its ``size`` most recently used entries;
* :func:`job_key`: a job as such a map's key: its configuration and the content digests of the files
  it reads, so that another job, or an edited file, never finds a stale entry;
* :func:`forget`: empties every :class:`Recent` map (a client process's new run starts afresh).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from fedlora.job.paths import digest_of
from fedlora.job.schema import JobConfig

V = TypeVar("V")
_MAPS: list[Recent] = []


class Recent(Generic[V]):
    """A map of the ``size`` most recently used entries, each made on first use.

    Parameters
    ----------
    size : int
        Entries kept: the least recently used one is dropped for a new one beyond it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[Hashable, V] = OrderedDict()
        _MAPS.append(self)

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The entry of ``key``, made by ``make()`` when there is none (what ``make`` raises is not kept)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = make()
        self.entries[key] = value
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()


def job_key(cfg: JobConfig) -> tuple[str, str | None, str | None]:
    """``cfg`` as a key: its every setting, and the content digests of ``--data`` and ``--test-data``
    (each file hashed once a process while its size and time stay)."""
    return repr(cfg), digest_of(cfg.data), digest_of(cfg.test_data)


def forget() -> None:
    """Empty every :class:`Recent` map."""
    for kept in _MAPS:
        kept.clear()
