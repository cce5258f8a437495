"""The one exception type for errors a user can cause.

Anything raised as :class:`TridentError` is shown to the user as a one-line message (the CLI and the
server never print a stack trace for it). The message says what is wrong and how to fix it.
"""

from __future__ import annotations


class TridentError(Exception):
    """A user-caused error (bad path, corrupt file, unsupported model, invalid request, ...)."""
