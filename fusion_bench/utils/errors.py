"""The one exception type for bad input: a wrong path, mismatched models, a bad hyper-parameter.

The CLI prints its message as a single line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class InputError(ValueError):
    """The user's input cannot be used; the message names the problem and the fix."""
