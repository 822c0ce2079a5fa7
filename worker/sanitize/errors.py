"""The engine's errors that callers act on: bad input (the user can fix it) and cancellation."""

class InputError(ValueError):
    """The user's model, samples or config cannot be used; the message says what to fix."""


class Cancelled(Exception):
    """The run was cancelled between two steps."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to ``limit`` characters."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]
