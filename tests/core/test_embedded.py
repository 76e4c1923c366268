"""The embedded MNIST models, the sampler, the evaluation helpers and their bad input."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from segquant import SegQuantError  # noqa: E402
from segquant.app.embedded import (EMBEDDED_DENOISERS, load_classifier, load_denoiser,  # noqa: E402
                                   mnist_test_feature_stats, pack, sample, sample_labels, unpack, weights_dir)
from segquant.app.embedded.images import grid  # noqa: E402
from segquant.app.evaluation import (layer_sqnr, linear_flops, quantized_flop_fraction,  # noqa: E402
                                     record_linear_io, score_images)
from segquant.app.metrics import frechet_distance, frechet_distance_to_stats  # noqa: E402


@pytest.mark.parametrize("name", EMBEDDED_DENOISERS)
def test_embedded_denoiser_loads_as_a_diffusers_model(name):
    den = load_denoiser(name)
    expected = {"mnist-flux": "FluxTransformer2DModel", "mnist-unet": "UNet2DConditionModel"}[name]
    assert type(den.model).__name__ == expected and not den.model.training
    assert all(p.dtype == torch.float32 for p in den.model.parameters())
    meta = json.loads((weights_dir() / name / "training.json").read_text())
    assert meta["parameters"] == sum(p.numel() for p in den.model.parameters())
    x = torch.zeros(2, 1, 32, 32)
    v = den.velocity(x, torch.full((2,), 0.5), torch.tensor([3, 7]))
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_shipped_weights_stay_small():
    total = sum(p.stat().st_size for p in weights_dir().rglob("*") if p.is_file())
    assert total < 40e6


def test_sampler_is_deterministic_and_the_unet_draws_the_requested_digits():
    den, clf = load_denoiser("mnist-unet"), load_classifier()
    labels = sample_labels(20)
    a = sample(den, labels, seed=3, steps=8, progress=False)
    b = sample(den, labels, seed=3, steps=8, progress=False)
    c = sample(den, labels[:2], seed=4, steps=8, progress=False)  # another seed: other images (two are enough)
    assert torch.equal(a, b) and not torch.equal(a[:2], c)
    assert a.shape == (20, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    with torch.no_grad():
        accuracy = (clf(a).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.8  # trained weights, not noise: a random net scores ~0.1


def test_flux_sampler_same_noise_for_every_batch_size():
    den = load_denoiser("mnist-flux")
    labels = sample_labels(3)
    whole = sample(den, labels, seed=1, steps=2, progress=False)
    split = sample(den, labels, seed=1, steps=2, batch_size=2, progress=False)
    torch.testing.assert_close(whole, split, rtol=1e-4, atol=1e-4)


def test_pack_unpack_round_trip():
    x = torch.randn(2, 1, 32, 32)
    assert pack(x).shape == (2, 256, 4)
    assert torch.equal(unpack(pack(x)), x)


def test_feature_statistics_and_frechet_to_stats():
    mean, cov = mnist_test_feature_stats()
    assert mean.shape == (128,) and cov.shape == (128, 128)
    torch.testing.assert_close(cov, cov.T)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g) + 1
    # identical to the two-set form when the statistics are b's own
    assert frechet_distance_to_stats(a, b.mean(0), torch.cov(b.T)) == pytest.approx(frechet_distance(a, b), rel=1e-6)
    # closed form: equal covariances, mean shift d -> |d|^2
    assert frechet_distance_to_stats(a, a.mean(0) + 2, torch.cov(a.T)) == pytest.approx(4 * 4, rel=1e-6)
    with pytest.raises(SegQuantError, match="do not fit"):
        frechet_distance_to_stats(a, mean, cov)
    with pytest.raises(SegQuantError, match="N >= 2"):
        frechet_distance_to_stats(a[:1], a.mean(0), torch.cov(a.T))


def test_layer_sqnr_flops_and_quantized_fraction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    io = record_linear_io(model, lambda: model(x))
    assert list(io) == ["0", "2"]
    flops = linear_flops(io)
    assert flops == {"0": 5 * 8 * 16, "2": 5 * 16 * 4}
    assert quantized_flop_fraction(flops, ["0"]) == pytest.approx(640 / 960)
    noisy = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    noisy.load_state_dict(model.state_dict())
    with torch.no_grad():
        noisy[2].weight.add_(0.01 * noisy[2].weight.abs().max())
    sq = layer_sqnr(noisy, io)
    assert sq["0"] == float("inf") and 10 < sq["2"] < 80


def test_score_images_and_grid():
    clf = load_classifier()
    ref = torch.rand(4, 1, 32, 32) * 2 - 1
    scores = score_images(ref, ref, torch.arange(4), clf)
    assert torch.isinf(scores.psnr).all() and torch.allclose(scores.ssim, torch.ones(4))
    noisy = (ref + 0.1 * torch.randn_like(ref)).clamp(-1, 1)
    summary = score_images(noisy, ref, torch.arange(4), clf).summary(scores, mnist_test_feature_stats())
    assert 15 < summary["psnr_db"] < 40 and "fid_vs_fp" not in summary and "fid_vs_mnist" not in summary
    many = torch.rand(40, 1, 32, 32) * 2 - 1
    labels = torch.arange(40) % 10
    base = score_images(many, many, labels, clf)
    noisy = (many + 0.3 * torch.randn_like(many)).clamp(-1, 1)
    summary = score_images(noisy, many, labels, clf).summary(base, mnist_test_feature_stats())
    assert summary["fid_vs_fp"] > 0 and summary["fid_vs_mnist"] > summary["fid_vs_fp"]
    mosaic = grid([ref, ref[:2]], pad=2)
    assert mosaic.shape == (2 * 34 + 2, 4 * 34 + 2) and mosaic.dtype == torch.uint8


def test_bad_input(tmp_path):
    with pytest.raises(SegQuantError, match="neither an embedded model"):
        load_denoiser("mnist-gan")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SegQuantError, match="not a diffusers model folder"):
        load_denoiser(str(tmp_path))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(SegQuantError, match="expected a FluxTransformer2DModel"):
        load_denoiser(str(tmp_path))
    den = load_denoiser("mnist-unet")
    with pytest.raises(SegQuantError, match="labels must lie in 0..10"):
        sample(den, torch.tensor([11]), progress=False)
    with pytest.raises(SegQuantError, match="steps must be >= 1"):
        sample(den, torch.tensor([1]), steps=0, progress=False)
    with pytest.raises(SegQuantError, match="at least one row"):
        grid([])


def test_training_script_writes_a_folder_that_loads(tmp_path):
    """examples/train_mnist_models.py on a few fake digits: its output is the embedded layout."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "train_mnist_models.py"
    spec = importlib.util.spec_from_file_location("train_mnist_models", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    g = torch.Generator().manual_seed(0)
    fake = (torch.rand(16, 1, 32, 32, generator=g) * 2 - 1, torch.arange(16) % 10)
    data = {"train": fake, "valid": fake, "test": fake}
    den, steps, losses = train.train_denoiser("unet", data, seed=0, minutes=0.0, lr=1e-3, batch=4, device="cpu",
                                              log=lambda msg: None)
    assert steps == 0 and losses == []
    den, steps, losses = train.train_denoiser("unet", data, seed=0, minutes=0.02, lr=1e-3, batch=4, device="cpu",
                                              log=lambda msg: None)
    assert steps >= 1 and all(torch.isfinite(torch.tensor(losses)))
    train.save_denoiser(den, tmp_path / "mine", "unet", {"steps": steps})
    loaded = load_denoiser(str(tmp_path / "mine"))
    assert loaded.family == "unet" and type(loaded.model).__name__ == "UNet2DConditionModel"
    v = loaded.velocity(torch.zeros(1, 1, 32, 32), torch.full((1,), 0.5), torch.tensor([1]))
    assert torch.isfinite(v).all()
