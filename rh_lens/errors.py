"""Exceptions rh_lens raises for bad input.  Each message names the problem and what to do."""


class RhLensError(ValueError):
    """Base class: every rh_lens input error is a ``ValueError``."""


class ModelLoadError(RhLensError):
    """A model spec could not be resolved or its files could not be loaded."""


class ContextTooLongError(RhLensError):
    """A prompt is longer than the model's context window (``model.cfg.n_ctx``)."""
