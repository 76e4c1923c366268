"""Measurements shared by ``segquant run`` and the quality benchmark: per-layer SQNR of a quantized model
against its full-precision twin on the same inputs, the share of Linear FLOPs that run quantized, and image
metrics of the embedded models against full-precision samples and MNIST."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from segquant.numerics import sqnr_db
from segquant.recording import record_linears

from .metrics import frechet_distance, frechet_distance_to_stats, psnr, ssim


def record_linear_io(model: nn.Module, call: Callable[[], Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """Run ``call`` once (no grad) and return every Linear's (input, output) of its first call, as copies.

    Every call is held until ``call`` returns (``segquant.recording.record_linears``): keep ``call`` to one forward
    pass, not a whole sampling loop."""
    with record_linears(model, outputs=True, transform=lambda t: t.detach().clone()) as recording, torch.no_grad():
        call()
    return recording.first()


def layer_sqnr(quantized: nn.Module, reference_io: dict[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
    """SQNR (dB) of each quantized Linear against the full-precision output, fed the SAME full-precision
    input: the error each layer adds on its own, free of the error that reaches it from earlier layers."""
    out = {}
    with torch.no_grad():
        for name, (x, y) in reference_io.items():
            layer = quantized.get_submodule(name)
            weight = getattr(layer, "weight", None)
            dtype = weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else x.dtype
            out[name] = sqnr_db(y.float(), layer(x.to(dtype)).float())
    return out


def mean_sqnr(layer_sqnr_db: dict[str, float], names: Iterable[str], quantized: Iterable[str]) -> float | None:
    """Mean SQNR (dB) over the layers of ``names`` that run quantized (None when there are none)."""
    quantized = set(quantized)
    values = [layer_sqnr_db[n] for n in names if n in layer_sqnr_db and n in quantized]
    return sum(values) / len(values) if values else None


def linear_flops(reference_io: dict[str, tuple[Tensor, Tensor]]) -> dict[str, int]:
    """Multiply-accumulates of each Linear in the recorded call (rows x in_features x out_features)."""
    return {name: (x.numel() // x.shape[-1]) * x.shape[-1] * y.shape[-1] for name, (x, y) in reference_io.items()}


def quantized_flop_fraction(flops: dict[str, int], quantized: Iterable[str]) -> float:
    """Share of the Linear FLOPs that run quantized."""
    quantized = set(quantized)
    total = sum(flops.values())
    return sum(v for k, v in flops.items() if k in quantized) / total if total else 0.0


MIN_FID_SAMPLES = 32


@dataclass(frozen=True)
class ImageScores:
    """Per-image scores of one row against the full-precision samples (same noise, same labels)."""

    psnr: Tensor      # (N,) dB, images mapped to [0, 1]
    ssim: Tensor      # (N,)
    correct: Tensor   # (N,) bool, classifier agrees with the requested class
    features: Tensor  # (N, D) classifier features

    def summary(self, reference: "ImageScores | None", mnist_stats: tuple[Tensor, Tensor] | None) -> dict[str, Any]:
        """Means, plus feature-FID against the reference row and against MNIST from ``MIN_FID_SAMPLES`` images
        on (below that the 128-d covariance estimate makes it noise; with fewer samples than feature dimensions
        it is still dominated by estimation noise: compare rows, not absolutes)."""
        out: dict[str, Any] = {"class_accuracy": float(self.correct.float().mean())}
        finite = torch.isfinite(self.psnr)
        out["psnr_db"] = float(self.psnr[finite].mean()) if finite.any() else float("inf")
        out["ssim"] = float(self.ssim.mean())
        n = self.features.shape[0]
        if reference is not None and n >= MIN_FID_SAMPLES:
            out["fid_vs_fp"] = frechet_distance(self.features, reference.features)
        if mnist_stats is not None and n >= MIN_FID_SAMPLES:
            out["fid_vs_mnist"] = frechet_distance_to_stats(self.features, *mnist_stats)
        return out


def score_images(images: Tensor, reference: Tensor, labels: Tensor, classifier: nn.Module) -> ImageScores:
    """Score ``images`` (N, 1, H, W) in [-1, 1] against the full-precision ``reference`` of the same noise."""
    a, b = (reference.float() + 1) / 2, (images.float() + 1) / 2
    device = next(classifier.parameters()).device
    with torch.no_grad():
        feats = classifier.features(images.float().to(device))
        logits = classifier.head(feats)
    return ImageScores(psnr(a, b), ssim(a, b), (logits.argmax(1).cpu() == labels.cpu()), feats.cpu().double())
