class InputError(ValueError):
    """The user's model, samples or config cannot be used; the message says what to fix."""


class Cancelled(Exception):
    """The run was cancelled between two steps."""
