"""The one exception type that means "the user's input or config is wrong".

Console scripts print it as a single line and exit with status 2; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, bad config or missing files, explained in one line."""


class RunError(Exception):
    """The run cannot go on (disk full, no intact checkpoint, too many skipped steps), explained in
    one line; exit status 1, and whatever was committed before it stays intact."""
