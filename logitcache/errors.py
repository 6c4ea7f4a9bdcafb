"""The one exception type a user mistake raises: the CLI prints it as one line, no traceback."""

from __future__ import annotations

import re

# The last line of a formatted traceback of one of ours: "logitcache.store.DamagedCache: <message>"
_RAISED = re.compile(r"^(?:\w+\.)*(?:LogitcacheError|DamagedCache): (.*)$")


class LogitcacheError(Exception):
    """A problem with the user's input or environment, worded for the user."""


def user_message(error: LogitcacheError) -> str:
    """The message a user should read. A DataLoader re-raises a worker's exception with the worker's whole
    traceback as its text ("Caught LogitcacheError in DataLoader worker process 0. Original Traceback ..."); the
    original message is its last line."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    for line in reversed(text.strip().splitlines()):
        match = _RAISED.match(line)
        if match:
            return match.group(1)
    return text.strip().splitlines()[-1]
