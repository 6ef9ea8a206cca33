"""Errors a user can act on. The CLI prints them as one line and exits non-zero, no traceback."""


class PerfusionError(Exception):
    """A problem with the user's input or environment: the message says what and what to do."""

    exit_code = 2


class ConceptFileError(PerfusionError):
    """A concept file that is missing, truncated, corrupt, or not a Perfusion concept."""


class ModelError(PerfusionError):
    """A base model that cannot be found, loaded or matched."""
