"""The exception types that the CLI turns into a single line and exit code 2 (130 when interrupted), and the warning
it prints as one line."""


class ShoalError(Exception):
    """A problem the user can act on: say what was wrong, where, and how to fix it."""


class EveryTrialFailed(ShoalError):
    """A search stopped, or has nothing to pick, because its trials failed: a whole generation the same way, or
    every trial."""


class ShoalWarning(UserWarning):
    """Something shoal did differently from what the input literally says (e.g. a parameter it ignored); the CLI
    prints it as one line."""


class Interrupted(Exception):
    """Ctrl-C stopped a command; the message says what was kept and how to go on. The CLI prints it, exit code 130."""
