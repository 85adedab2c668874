"""The exceptions users see: each message says in one line what went wrong and what to do."""

import sys


class SparvarError(Exception):
    """Bad input or an unusable environment; the CLI prints the message and exits with status 2.

    The message is kept to one line: line breaks (of a quoted library error, say) become spaces.
    """

    status = 2  # the command's exit status

    def __init__(self, message: str):
        super().__init__(" ".join(line.strip() for line in str(message).splitlines() if line.strip()))


class Stopped(SparvarError):
    """A batch job ended by a signal between two writes (Ctrl+C, SIGTERM): the CLI prints the
    message as it is and exits with 128 + the signal's number (130, 143), as shells do."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.status = 128 + signal_number


def run_module(main) -> None:
    """Runs a `python -m` entry point's main() as `sparvar` runs its commands: bad input ends it
    with one `error:` line and the error's exit status, never a traceback."""
    try:
        main()
    except SparvarError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.status)
