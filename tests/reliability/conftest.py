import pytest


@pytest.fixture(scope="session")
def flux_folder(tmp_path_factory):
    """A tiny FLUX pipeline saved as a local diffusers folder (the model the CLI cases point at)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from _models import build_tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("flux") / "pipe"
    build_tiny_flux_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def flux():
    """Tiny FLUX (not to be changed by a test), its example inputs and the mnist-flux INT8 applied plan."""
    pytest.importorskip("diffusers")
    import segquant
    from segquant.recipe import load_recipe
    from _models import build_tiny

    model = build_tiny("FluxTransformer2DModel")
    kwargs = segquant.example_inputs(model)
    plan = load_recipe("mnist-flux/int8_w8a8").apply(segquant.analyze(model, **kwargs))
    return model, kwargs, plan
