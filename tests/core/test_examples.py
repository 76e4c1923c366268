"""Every example (backend x family) runs on a tiny random pipeline saved to a temp folder, through the
same loading code as the real model, and its reloaded pipeline makes the same images as the quantized one."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from _models import TINY_PIPELINES  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY_RUN = ["--dtype", "float32", "--device", "cpu", "--num-prompts", "2", "--steps", "2", "--height", "32",
            "--width", "32", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    """Family -> folder of its tiny pipeline, built once per module on first use."""
    folders = {}

    def get(family):
        if family not in folders:
            folders[family] = tmp_path_factory.mktemp(family)
            TINY_PIPELINES[family](folders[family])
        return folders[family]

    return get


def run_example(backend, family, argv):
    spec = importlib.util.spec_from_file_location(f"example_{backend}_{family}", EXAMPLES / f"{backend}_{family}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def images(pipe, settings):
    from segquant.app.pipelines import call_kwargs

    return pipe("a photo of a dog", generator=torch.Generator().manual_seed(1), output_type="pt",
                **call_kwargs(pipe, settings)).images


def test_one_example_per_backend_and_family():
    names = {p.stem for p in EXAMPLES.glob("*.py")} - {"train_mnist_models"}  # tested in test_embedded.py
    assert names == {f"{b}_{f}" for b in ("modelopt", "torchao") for f in TINY_PIPELINES}


@pytest.mark.parametrize("family", sorted(TINY_PIPELINES))
@pytest.mark.parametrize("backend", ["modelopt", "torchao"])
def test_example_round_trip_is_bit_identical(backend, family, tiny_pipelines, tmp_path, capsys):
    pytest.importorskip("modelopt.torch.quantization" if backend == "modelopt" else "torchao")
    out = tmp_path / "out"
    result, loaded = run_example(backend, family, ["--model", str(tiny_pipelines(family)), "--out", str(out),
                                                   *TINY_RUN])
    assert f"{result.recipe.name} ({backend})" in capsys.readouterr().out
    assert (out / "sample.png").is_file() and (out / "segquant.json").is_file()
    assert type(loaded) is type(result.pipe)
    expected = images(result.pipe, result.calibration)
    assert torch.isfinite(expected).all()
    full_precision = diffusers.DiffusionPipeline.from_pretrained(tiny_pipelines(family))
    assert not torch.equal(images(full_precision, result.calibration), expected)  # it was quantized
    assert torch.equal(images(loaded, result.calibration), expected)
