"""The error type for bad user input, the one wrapper every command line uses for it, and the one
way a warning about the user's input is said: once per process (:func:`warn_once`)."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator

#: The warnings said in this process: a file or model read twice (a derived --max-length, then the
#: job; a model's path resolved for its tokenizer, then its weights) is warned about once.
SAID: set[str] = set()


#: Who hears each note besides stderr, ``listener(message)`` (:func:`listening`): the ServerApp logs
#: them into ``OUT/server.log``, as its own stderr reaches no terminal.
LISTENERS: list[Callable[[str], None]] = []


def say(message: str) -> None:
    """Print ``fedlora: MESSAGE`` on stderr (a note about the job or its input), and hand it to each
    of :data:`LISTENERS`."""
    print(f"fedlora: {message}", file=sys.stderr)
    for listener in list(LISTENERS):
        listener(message)


@contextlib.contextmanager
def listening(listener: Callable[[str], None]) -> Iterator[None]:
    """``listener`` hears every note :func:`say` says within the block."""
    LISTENERS.append(listener)
    try:
        yield
    finally:
        LISTENERS.remove(listener)


def warn_once(message: str) -> None:
    """:func:`say` ``message``, unless this process has already said it."""
    if message not in SAID:
        SAID.add(message)
        say(message)


class UserError(Exception):
    """Bad input (flag, file, model, column): its message says what is wrong and how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none): what a one-line
    refusal quotes of a library's error."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def command(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``main(argv) -> exit code``: a :class:`UserError` becomes the line
    ``PROG: error: MESSAGE`` on stderr and exit code 2; Ctrl-C exits 130."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except UserError as exc:
                print(f"{prog}: error: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                return 130

        return run

    return wrap
