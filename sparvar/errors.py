"""The one exception type users see: its message says in one line what went wrong and what to do."""


class SparvarError(Exception):
    """Bad input or an unusable environment; the CLI prints the message and exits with status 2.

    The message is kept to one line: line breaks (of a quoted library error, say) become spaces.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(line.strip() for line in str(message).splitlines() if line.strip()))
