"""What a fedlora user cannot act on, kept off the output: transformers' logging and progress bars while
a model or tokenizer loads (:class:`quiet`), and bitsandbytes' import warnings (:func:`import_bitsandbytes`,
by ``--quantize`` and before PEFT, which imports it too)."""

from __future__ import annotations

import logging


class _Once(logging.Filter):
    """Let a logger's first record through, and no later one with the same message."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        new = record.msg not in self.seen
        self.seen.add(record.msg)
        return new


def import_bitsandbytes() -> None:
    """Import bitsandbytes without its warning, on an AVX512-BF16 CPU, that the optional ``kernels``
    package of its repacked CPU inference kernel is missing (fedlora does not use that kernel:
    see :func:`fedlora.models.quantize.check_quantized`)."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    finally:
        log.setLevel(level)
    matmul = logging.getLogger("bitsandbytes.autograd._functions")  # int8: "inputs cast to fp16", per call
    if not any(isinstance(f, _Once) for f in matmul.filters):
        matmul.addFilter(_Once())


class quiet:
    """transformers' logging at error level and without progress bars, for one block."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.log, self.verbosity = hf_logging, hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        self.log.set_verbosity(self.verbosity)
        self.log.enable_progress_bar()
