"""The one exception type that the CLI turns into a single line and exit code 2."""


class ShoalError(Exception):
    """A problem the user can act on: say what was wrong, where, and how to fix it."""


class Interrupted(Exception):
    """Ctrl-C stopped a command; the message says what was kept and how to go on. The CLI prints it, exit code 130."""
