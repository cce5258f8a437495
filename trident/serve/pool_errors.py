"""What the ModelPool refuses with, each answered with its own HTTP status (see errors.py)."""

from __future__ import annotations

from trident.errors import TridentError


class UnknownModelError(TridentError):
    """No served model or alias has this name (404)."""


class ModelCapacityError(TridentError):
    """The model does not fit in the memory budget now: the models that would have to go are busy (503)."""


class ModelTooLargeError(TridentError):
    """The model alone needs more than the whole memory budget (400)."""


class ModelBusyError(TridentError):
    """The model cannot be unloaded while it has requests (409)."""


class ModelConflictError(TridentError):
    """A model of this name already exists with other settings (409)."""
