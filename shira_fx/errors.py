"""Exceptions raised by shira_fx; each message names the object, what was expected and what was found."""


class ShiraError(Exception):
    """Base class of every error shira_fx raises on purpose."""


class ShiraConfigError(ShiraError, ValueError):
    """A `ShiraConfig` field, or the model it is applied to, does not fit."""


class ShiraAdapterError(ShiraError, ValueError):
    """An adapter (file, directory or object) is malformed or does not belong to this model."""


class ShiraTrainingError(ShiraError, RuntimeError):
    """A training step was refused (non-finite loss or gradient); nothing was applied."""


class ShiraWarning(UserWarning):
    """Something works, but not as the user likely expects (e.g. a compiled model that runs
    its prepared layers eagerly); the message says why and what to do."""
