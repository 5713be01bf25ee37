"""Exceptions raised by prunekit.

Every check on user input raises a subclass of :class:`PrunekitError`, whose message names
the offending value, so a CLI can print it without a traceback.
"""


class PrunekitError(Exception):
    """Base class of every error prunekit raises on purpose."""


class ConfigError(PrunekitError, ValueError):
    """A setting (sparsity, algorithm name, backend, model, schedule, ...) is invalid."""


class ModelError(PrunekitError, ValueError):
    """The model cannot be pruned as asked (no prunable layer, NaN/Inf weights, ...)."""


class PlanError(PrunekitError, ValueError):
    """A pruning plan or checkpoint does not belong to this model or is damaged."""


class DataError(PrunekitError, FileNotFoundError):
    """A data set folder or file is missing or malformed."""


class BackendUnavailable(PrunekitError, ImportError):
    """The framework behind a backend is not installed."""
