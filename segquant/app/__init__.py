"""The SegQuant application on top of the library: the ``segquant`` command line, the quantize job for
diffusers pipelines (``quantize_pipeline``, ``load_quantized``), the main ``segquant run`` job on the embedded
MNIST models, its report, metrics and evaluation.

The library (``segquant``) never imports this package; this package uses the library's public names and the
backends registered under the ``segquant.backends`` entry-point group.

Example:
    >>> from segquant.app import QuantizeJob, quantize_pipeline, load_quantized
    >>> quantize_pipeline(QuantizeJob(model="black-forest-labs/FLUX.1-dev", out="flux_int8"))
    >>> pipe = load_quantized("flux_int8")
"""

from .quantize_job import QuantizeJob, QuantizeResult, load_quantized, quantize_pipeline

__all__ = ["QuantizeJob", "QuantizeResult", "load_quantized", "quantize_pipeline"]
