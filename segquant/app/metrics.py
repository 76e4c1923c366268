"""Image-quality metrics and paired statistics for quality benchmarks (SPEC section 5).

The reference images are the full-precision model's own samples from the same noise: PSNR and SSIM per
image against them, Frechet distance between feature sets, and confidence intervals of PAIRED differences
(same noise, same calibration set) so that small effects can be told from noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from segquant.errors import SegQuantError


def _check_pair(reference: Tensor, images: Tensor) -> None:
    if reference.shape != images.shape or reference.dim() != 4:
        raise SegQuantError(f"expected two (N, C, H, W) batches of the same shape, got {tuple(reference.shape)} "
                            f"and {tuple(images.shape)}")


def psnr(reference: Tensor, images: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, ``(N,)``; identical images give ``inf``."""
    _check_pair(reference, images)
    mse = (reference.double() - images.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse)).float()


def _gaussian_window(size: int, sigma: float, channels: int, dtype: torch.dtype) -> Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(reference: Tensor, images: Tensor, data_range: float = 1.0, window: int = 7, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image, ``(N,)`` (Wang et al. 2004; Gaussian window, channel mean).

    Uses K1 = 0.01, K2 = 0.03, a ``window`` x ``window`` Gaussian (sigma 1.5) and the sample covariance,
    as scikit-image's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)`` with
    the mean taken over valid (unpadded) positions.
    """
    _check_pair(reference, images)
    if min(reference.shape[-2:]) < window:
        raise SegQuantError(f"images of {tuple(reference.shape[-2:])} are smaller than the SSIM window {window}")
    x, y = reference.double(), images.double()
    c = x.shape[1]
    w = _gaussian_window(window, sigma, c, x.dtype)

    def blur(t: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def _sqrtm_psd(m: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two ``(N, D)`` feature sets (FID on any features)."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise SegQuantError(f"expected (N, D) feature sets of the same D, got {tuple(features_a.shape)} and "
                            f"{tuple(features_b.shape)}")
    if min(len(features_a), len(features_b)) < 2:
        raise SegQuantError("Frechet distance needs at least 2 samples per set")
    a, b = features_a.double(), features_b.double()
    return frechet_distance_to_stats(a, b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1))


def frechet_distance_to_stats(features: Tensor, mean: Tensor, cov: Tensor) -> float:
    """Frechet distance between a Gaussian fitted to ``(N, D)`` features and one given by ``mean``/``cov``
    (e.g. shipped statistics of a reference dataset)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise SegQuantError(f"expected (N >= 2, D) features, got {tuple(features.shape)}")
    d = features.shape[1]
    if mean.shape != (d,) or cov.shape != (d, d):
        raise SegQuantError(f"reference statistics of shape {tuple(mean.shape)}/{tuple(cov.shape)} do not fit "
                            f"{d}-d features")
    a = features.double()
    mu_a, mu_b, cov_b = a.mean(0), mean.double(), cov.double()
    cov_a = torch.cov(a.T).reshape(d, -1)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross)
    return float(value.clamp(min=0))


@dataclass(frozen=True)
class PairedInterval:
    """Mean of paired differences ``a - b`` with a bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def significant(self) -> bool:
        """True when the interval excludes zero."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}] ({self.confidence:.0%}, n={self.n})"


def paired_interval(a: Tensor, b: Tensor, confidence: float = 0.95, resamples: int = 10_000,
                    seed: int = 0) -> PairedInterval:
    """Percentile-bootstrap interval of the mean paired difference ``a - b`` (deterministic by ``seed``).

    Pairs are (image, calibration seed) measurements taken with the same noise under both settings, so
    their difference removes the variation both share.
    """
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape or a.numel() < 2:
        raise SegQuantError(f"paired_interval needs two equally long series of >= 2 values, got {a.numel()} and "
                            f"{b.numel()}")
    if not 0 < confidence < 1:
        raise SegQuantError(f"confidence must be in (0, 1), got {confidence}")
    diff = a - b
    if not torch.isfinite(diff).all():
        raise SegQuantError("paired_interval got NaN or Inf values (e.g. PSNR of identical images)")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, diff.numel(), (resamples, diff.numel()), generator=g)
    means = diff[idx].mean(1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedInterval(float(diff.mean()), low, high, diff.numel(), confidence)
