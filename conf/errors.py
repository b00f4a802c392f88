"""The one exception type that means "the user's input or config is wrong".

Console scripts print it as a single line and exit with status 2; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, bad config or missing files, explained in one line."""


def unwrap_worker_error(exc: UserError) -> UserError:
    """The one line of a UserError (or a subclass) raised in a torch DataLoader worker, which torch
    re-raises with the worker's whole traceback as the message."""
    cls = type(exc)
    text, marker = str(exc), f"{cls.__module__}.{cls.__qualname__}: "
    if "DataLoader worker" in text and marker in text:
        return cls(text.rsplit(marker, 1)[1].strip())
    return exc


class RunError(Exception):
    """The run cannot go on (disk full, no intact checkpoint, too many skipped steps), explained in
    one line; exit status 1, and whatever was committed before it stays intact."""
