"""The one exception type a user mistake raises: the CLI prints it as one line, no traceback."""


class LogitcacheError(Exception):
    """A problem with the user's input or environment, worded for the user."""
