"""The precision registry: a precision name -> what it quantizes and how (one ``PrecisionSpec``).

Recipes name a precision, the applied plan carries it per layer, and every backend maps it to its own
idiom from this one table (ModelOpt quantizer attributes, torchao layer options).

Example:
    >>> spec = get_precision("fp8")
    >>> spec.weight_format, spec.activation
    ('fp8', 'static')
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SegQuantError
from .numerics import QuantSpec, get_format
from .options import ACTIVATION_MODES, DEFAULT_REALISATION, WEIGHT_GRANULARITIES, check_choice


@dataclass(frozen=True)
class PrecisionSpec:
    """One precision.

    Args:
        name: registry key (``int8_w8a8``, ``fp8`` ...).
        weight_format: ``segquant.numerics`` format of the weights (``int8``, ``int4``, ``fp8``).
        weight_granularity: ``per_tensor`` (one scale per output segment) or ``per_channel``.
        act_format: format of the activations.
        activation: ``static`` (calibrated) or ``dynamic`` (per token at run time).
        description: one line for help texts and recipe headers.
    """

    name: str
    weight_format: str
    weight_granularity: str
    act_format: str
    activation: str
    description: str = ""

    def __post_init__(self) -> None:
        get_format(self.weight_format)
        get_format(self.act_format)
        check_choice(self.weight_granularity, WEIGHT_GRANULARITIES, f"precision {self.name}: weight_granularity")
        check_choice(self.activation, ACTIVATION_MODES, f"precision {self.name}: activation")

    def quant_spec(self, realisation: str = DEFAULT_REALISATION) -> QuantSpec:
        """The ``segquant.numerics.QuantSpec`` of this precision (the reference both backends match)."""
        return QuantSpec(weight_format=self.weight_format, weight_granularity=self.weight_granularity,
                         act_format=self.act_format,
                         act_granularity="per_token" if self.activation == "dynamic" else "per_tensor",
                         realisation=realisation)


PRECISIONS: dict[str, PrecisionSpec] = {spec.name: spec for spec in (
    PrecisionSpec("int8_w8a8", "int8", "per_tensor", "int8", "static",
                  "the paper's W8A8: INT8 per-tensor weights (one scale per output segment) and static activations "
                  "(one per input segment, two on DualScale segments)"),
    PrecisionSpec("int8_perchannel", "int8", "per_channel", "int8", "static",
                  "INT8 per-channel weights, static per-segment activations"),
    PrecisionSpec("fp8", "fp8", "per_tensor", "fp8", "static",
                  "FP8 e4m3 per-tensor weights and static per-segment activations"),
    PrecisionSpec("w4a8", "int4", "per_channel", "int8", "dynamic",
                  "INT4 per-channel weights, INT8 per-token dynamic activations (per segment and sign)"),
)}
"""Every precision SegQuant has, by name."""


def precision_names() -> tuple[str, ...]:
    return tuple(PRECISIONS)


def get_precision(name: str) -> PrecisionSpec:
    """The ``PrecisionSpec`` called ``name``; a ``SegQuantError`` listing the known ones otherwise."""
    if not isinstance(name, str) or name not in PRECISIONS:
        raise SegQuantError(f"unknown precision {name!r}; one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]
