import math

import pytest
import torch

from segquant import SegQuantError
from segquant.app.metrics import frechet_distance, paired_interval, psnr, ssim


def test_psnr_known_values():
    ref = torch.zeros(2, 1, 8, 8)
    img = ref.clone()
    img[0] += 0.1  # MSE 0.01 -> 20 dB
    img[1] += 0.01  # MSE 1e-4 -> 40 dB
    torch.testing.assert_close(psnr(ref, img), torch.tensor([20.0, 40.0]))
    assert math.isinf(psnr(ref, ref)[0].item())


def test_ssim_against_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    ref = torch.rand(3, 1, 32, 32)
    noisy = (ref + 0.1 * torch.randn_like(ref)).clamp(0, 1)
    ours = ssim(ref, noisy)
    theirs = [metrics.structural_similarity(r[0].numpy(), n[0].numpy(), data_range=1.0, gaussian_weights=True,
                                            sigma=1.5, use_sample_covariance=False, win_size=7)
              for r, n in zip(ref, noisy)]
    # scikit-image averages over the whole image after cropping (win_size - 1) / 2 = 3 pixels: the same
    # positions as our valid convolution
    torch.testing.assert_close(ours, torch.tensor(theirs, dtype=torch.float32), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ssim(ref, ref), torch.ones(3))
    assert (ssim(ref, noisy) < ssim(ref, (ref + 0.01 * torch.randn_like(ref)).clamp(0, 1))).all()


def test_frechet_distance_closed_form():
    torch.manual_seed(0)
    a = torch.randn(20000, 3)
    b = torch.randn(20000, 3) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([1.0, 0.0, 0.0])
    # diagonal Gaussians: |mu_a - mu_b|^2 + sum(s_a + s_b - 2 sqrt(s_a s_b)) = 1 + (0 + 1 + 0.25)
    assert frechet_distance(a, b) == pytest.approx(2.25, abs=0.1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_paired_interval_separates_a_shift_from_noise():
    torch.manual_seed(0)
    base = torch.randn(200) * 5  # large shared variation, removed by pairing
    shifted = paired_interval(base + 0.3 + 0.2 * torch.randn(200), base)
    assert shifted.significant and shifted.low < 0.3 < shifted.high
    same = paired_interval(base + 0.2 * torch.randn(200), base)
    assert not same.significant and same.low < 0 < same.high
    assert paired_interval(base + 1, base).mean == pytest.approx(1.0)
    assert "n=200" in str(shifted)


def test_metric_bad_input():
    with pytest.raises(SegQuantError, match="same shape"):
        psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(SegQuantError, match="smaller than the SSIM window"):
        ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(SegQuantError, match="same D"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(SegQuantError, match="equally long"):
        paired_interval(torch.zeros(3), torch.zeros(4))
    with pytest.raises(SegQuantError, match="NaN or Inf"):
        paired_interval(torch.tensor([1.0, float("inf")]), torch.zeros(2))
