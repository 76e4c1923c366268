"""SegQuant core: graph analysis into a plan, the plan's data types and reference numerics.

Example:
    >>> import segquant
    >>> plan = segquant.analyze(transformer, **segquant.example_inputs(transformer))
    >>> print(plan)
    >>> plan.save("plan.json")
"""

from . import numerics
from .backend import Backend, Capabilities, QuantizedLayer, QuantizeOptions, backend_names, get_backend
from .calib import SegmentAmaxObserver
from .errors import GraphAnalysisError, PlanError, SegQuantError
from .graph import AnalysisOptions, analyze, plan_from_graph
from .inputs import example_inputs, supported_models
from .plan import PLAN_VERSION, LinearPlan, SegQuantPlan, format_table
from .precision import PRECISIONS, PrecisionSpec, get_precision
from .recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = [
    "PLAN_VERSION", "PRECISIONS", "AnalysisOptions", "Backend", "Capabilities", "GraphAnalysisError", "LinearPlan",
    "PlanError", "PrecisionSpec", "QuantizeOptions", "QuantizedLayer", "Recipe", "SegQuantError", "SegQuantPlan",
    "SegmentAmaxObserver", "analyze", "backend_names", "example_inputs", "format_table", "get_backend",
    "get_precision", "load_recipe", "numerics", "plan_from_graph", "supported_models", "__version__",
]
