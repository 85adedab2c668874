"""The one exception type users see: its message says what went wrong and what to do."""


class SparvarError(Exception):
    """Bad input or an unusable environment; the CLI prints the message and exits non-zero."""
