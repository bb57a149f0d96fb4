"""Errors a user can act on. The CLI prints their message alone (no traceback) and exits non-zero.

Every message names the file, column or key; what was expected; and what to do.
"""


class UserError(Exception):
    """Bad input, bad config or a missing component: the message is the whole report."""

    exit_code = 2


class ConfigError(UserError):
    """A job file or flag with an unknown key, a wrong type or an impossible value."""


class InputError(UserError):
    """An input file that cannot be read as the corpus schema asks."""


class ModelError(UserError):
    """A model folder that is missing or of the wrong kind for the task."""


class RunStateError(UserError):
    """An output folder whose state forbids the run (e.g. another config's fingerprint)."""


class Stopped(Exception):
    """A stop was requested (a signal) while the run was still planning; nothing is lost."""
