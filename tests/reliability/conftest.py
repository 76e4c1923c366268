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
