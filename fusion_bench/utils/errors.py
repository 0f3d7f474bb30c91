"""The one exception type for bad input: a wrong path, mismatched models, a bad hyper-parameter.

The CLI prints its message as a single line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class InputError(ValueError):
    """The user's input cannot be used; the message names the problem and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (without its closing period), or its type where it
    has none: how a cause is quoted inside our one-line messages."""
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__
