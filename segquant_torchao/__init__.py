"""SegQuant for torchao (``quantize_(model, SegLinearConfig(...))``).

The adapter reads a ``segquant.SegQuantPlan``; its configs, handlers and kernels are built in the
issue "segquant_torchao: quantize_ configs with real FP8/INT8 kernels". Importing it checks that
torchao is installed.
"""

try:
    import torchao  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without torchao
    raise ImportError(f"segquant_torchao needs torchao>=0.18: pip install 'segquant[torchao]' [{e}]") from e

__all__: list[str] = []
