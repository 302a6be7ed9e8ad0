"""The few exception types the CLI maps to exit codes."""


class SiglipError(Exception):
    """An expected failure: the CLI prints its message (no traceback) and exits with exit_code."""

    exit_code = 1


class RunError(SiglipError):
    """The run could not be done: model missing, output not writable, output locked. Exit 1."""


class UsageError(SiglipError):
    """Bad options or input files named by options (an empty vocabulary, say). Exit 2."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """An exception's first non-empty line, or its type's name: what a one-line message quotes of it."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
