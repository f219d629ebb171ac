"""The job: its schema, flags and run-config codecs, defaults policy and checks.

``JobConfig`` is the one public name users need (``from fedlora.job import JobConfig``).
"""

from fedlora.job.schema import JobConfig

__all__ = ["JobConfig"]
