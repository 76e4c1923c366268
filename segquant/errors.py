"""Exceptions raised by SegQuant. Every message names the module, what was found and the fix."""


class SegQuantError(Exception):
    """Base class of every error SegQuant raises on bad input."""


class PlanError(SegQuantError, ValueError):
    """A plan is inconsistent with itself or with the model it is applied to."""


class GraphAnalysisError(SegQuantError):
    """The model's computation graph could not be captured or analysed."""
