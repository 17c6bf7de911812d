"""The one base of the errors a command ends with in one line (``selfsup: error: ...``, exit 2).

Raise a subclass where the message names the file, key or sample and says what to do; the command
line catches :class:`OneLineError` and prints it, never a traceback. A Ray worker that meets one
ends the run rather than spend a retry: no retry can heal what the message asks a person to fix.
"""


class OneLineError(Exception):
    """An error whose message is a whole answer: what is wrong, where, and what to do."""


class RunFailed(OneLineError, RuntimeError):
    """A run refused before it starts (a changed config, a GPU that is not there, workers no cluster can
    place) or stopped on an error a retry cannot heal."""
