"""Errors raised at batchscope's boundary. The CLI turns them into one line and exit code 2."""


class BatchscopeError(Exception):
    """A user-facing error: bad spec, missing or malformed file, unknown name."""


class SpecError(BatchscopeError, ValueError):
    """A run or sweep spec that does not validate."""


class DataError(BatchscopeError, ValueError):
    """A data set that is missing, malformed, or unknown."""


class ModelError(BatchscopeError, ValueError):
    """An unknown architecture or an invalid model option."""
