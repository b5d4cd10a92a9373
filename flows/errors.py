"""Errors raised by the modelling code (no dependency on pipeline/)."""


class FlowsError(Exception):
    """Base class of user-facing modelling errors (one-line message)."""


class NonFiniteLossError(FlowsError):
    """A NaN or inf loss stopped training; the last good checkpoint is kept."""
