"""User-facing errors: one clear line saying what to fix, never a traceback."""


class DistilleryError(Exception):
    """A problem with the user's input or environment, reported as one line by the CLI."""


class Diverged(DistilleryError):
    """Training stopped because the loss or the gradients stopped being finite."""
