"""What the user must fix, as exception types: every entry point prints such an error as one line
and exits 2. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A problem the user fixes: one line, exit code 2."""


class ConfigError(UserError):
    """A config key with a wrong value, type or name (the message names the key)."""


class DataError(UserError):
    """A dataset that cannot feed this config."""


class MismatchError(UserError):
    """A run, checkpoint or set of weights that does not fit what reads it: another model shape,
    tokenizer, objective setting or parameter layout."""


class TopologyError(UserError):
    """A run resumed with another number of data-loading processes or another data order."""


class RunError(UserError):
    """A run directory that cannot be read as asked (missing, no committed checkpoint, ...)."""
