"""The base class of the errors a user can fix: their message names the file or key, the value and the fix.

The command line prints such an error as one message, without a traceback; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations


class ATPUserError(Exception):
    """A refusal or a bad input, explained in full by its message."""


class MergeError(ATPUserError, RuntimeError):
    """A merge that cannot go ahead; the message names the file or key and the fix."""
