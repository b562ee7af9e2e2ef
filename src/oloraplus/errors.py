"""The one exception class for user-facing errors.

cli.py catches it and prints its message as one line with exit code 2; anything
else is a bug and keeps its traceback.
"""


class OLoRAPlusError(Exception):
    """Bad input from the user: a file, record, field or value we cannot use."""
