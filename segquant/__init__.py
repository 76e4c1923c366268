"""SegQuant core: graph analysis into a plan, the plan's data types and reference numerics.

Example:
    >>> import segquant
    >>> plan = segquant.analyze(transformer, **segquant.example_inputs(transformer))
    >>> print(plan)
    >>> plan.save("plan.json")
"""

from . import numerics
from .calib import SegmentAmaxObserver
from .errors import GraphAnalysisError, PlanError, SegQuantError
from .graph import AnalysisOptions, analyze, plan_from_graph
from .inputs import example_inputs, supported_models
from .plan import PLAN_VERSION, LinearPlan, SegQuantPlan, format_table

__version__ = "0.1.0"

__all__ = [
    "PLAN_VERSION", "AnalysisOptions", "GraphAnalysisError", "LinearPlan", "PlanError", "SegQuantError",
    "SegQuantPlan", "SegmentAmaxObserver", "analyze", "example_inputs", "format_table", "numerics",
    "plan_from_graph", "supported_models", "__version__",
]
