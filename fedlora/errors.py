"""The error type for bad user input: command lines print its one-line message and exit 2."""


class UserError(Exception):
    """Bad input (flag, file, model, column): its message says what is wrong and how to fix it."""
