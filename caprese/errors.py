"""The one exception type that reaches users as a single line (CLI prints it, no traceback).

Raise it for anything a user can fix: a missing file, an unsupported architecture, corrupt weights.
"""


class CapreseError(Exception):
    """A user-facing error: the message names the problem and what to do about it."""
