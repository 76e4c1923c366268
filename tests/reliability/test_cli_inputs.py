"""Hostile inputs to ``segquant quantize``: each is refused with one line on stderr and exit code 2, before the
pipeline is loaded where the input can be checked without it, and leaves the model folder, the inputs and the
output location as they were (files compared by hash)."""

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from segquant.app.cli import main  # noqa: E402

TINY = ["--dtype", "float32", "--device", "cpu", "--num-prompts", "1", "--steps", "1", "--height", "32",
        "--width", "32", "--no-progress"]
RECIPE_HEAD = "# schema: segquant.recipe.Recipe\nbase: mnist-flux/int8_w8a8\n"


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def recipe(text):
    return lambda tmp, model: ("--recipe", _write(tmp / "r.yaml", RECIPE_HEAD + text))


def _write(path: Path, content) -> str:
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return str(path)


def prompts(content):
    return lambda tmp, model: ("--prompts", _write(tmp / "prompts.txt", content))


def broken_model(edit):
    """A copy of the tiny pipeline with ``edit(folder)`` applied."""
    def setup(tmp, model):
        copy = tmp / "broken"
        shutil.copytree(model, copy)
        edit(copy)
        return ("--model", str(copy))
    return setup


def _config(folder: Path, **changes):
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# name -> (setup(tmp_path, model_folder) -> extra argv, expected message, checked before loading the pipeline)
CASES = {
    "recipe: quoted boolean": (recipe("dual_scale: 'false'\n"), "dual_scale must be true or false", True),
    "recipe: cut off after skip:": (recipe("skip:\n"), "skip must be a list of layer-name globs, got None", True),
    "recipe: unknown key": (recipe("smoothquant: 0.5\n"), "unknown keys \\['smoothquant'\\]; known: \\['name'", True),
    "recipe: alpha out of range": (recipe("smoothquant_alpha: 1.5\n"), "smoothquant_alpha must be in \\[0, 1\\]",
                                   True),
    "recipe: steps as a string": (recipe("calibration: {steps: '4'}\n"), "calibration.steps must be an integer",
                                  True),
    "recipe: negative segment": (recipe("overrides: {'*.proj_out': {in_segments: [-1]}}\n"),
                                 "overrides '\\*.proj_out': in_segments.0 must be greater than 0", True),
    "recipe: unknown override field": (recipe("overrides: {'*.proj_out': {colour: red}}\n"),
                                       "unknown keys \\['colour'\\]", True),
    "recipe: not YAML": (lambda tmp, model: ("--recipe", _write(tmp / "r.yaml", RECIPE_HEAD + "skip: [a\n")),
                         "not valid YAML", True),
    "recipe: binary file": (lambda tmp, model: ("--recipe", _write(tmp / "r.yaml", b"\xff\xfe\x00binary")),
                            "cannot read recipe", True),
    "recipe: a folder": (lambda tmp, model: ("--recipe", str(tmp)), "unknown recipe", True),
    "recipe: unknown bundled name": (lambda tmp, model: ("--recipe", "flux.1-dev/int3"), "unknown recipe", True),
    "recipe: another model's glob": (recipe("skip: ['down_blocks.*']\n"), "matches no layer", False),
    "prompts: missing file": (lambda tmp, model: ("--prompts", str(tmp / "none.txt")), "does not exist", True),
    "prompts: empty file": (prompts("\n  \n"), "holds no prompts", True),
    "prompts: binary file": (prompts(b"\xff\xfe\x00\x81"), "is not UTF-8 text", True),
    "flag: zero steps": (lambda tmp, model: ("--steps", "0"), "steps must be in \\[1, 1000\\], got 0", True),
    "flag: height not a multiple of 8": (lambda tmp, model: ("--height", "20"), "height must be a multiple of 8",
                                         True),
    "flag: negative prompt count": (lambda tmp, model: ("--num-prompts", "-3"), "num_prompts must be in", True),
    "flag: onnx on torchao": (lambda tmp, model: ("--backend", "torchao", "--onnx"), "has no ONNX export", True),
    "flag: device that is no torch device": (lambda tmp, model: ("--device", "gpu"), "'gpu' is not a torch device",
                                             True),
    "flag: a CUDA device this machine lacks": (lambda tmp, model: ("--device", "cuda:99"),
                                               "no CUDA device is available here|this machine has \\d+ CUDA", True),
    "model: missing folder": (lambda tmp, model: ("--model", str(tmp / "nothing")), "cannot load", False),
    "model: a file": (lambda tmp, model: ("--model", _write(tmp / "m.txt", "x")), "is a file", True),
    "model: no model_index.json": (broken_model(lambda f: (f / "model_index.json").unlink()),
                                   "has no model_index.json", True),
    "model: corrupt model_index.json": (broken_model(lambda f: (f / "model_index.json").write_text("{oops")),
                                        "model_index.json is not valid JSON", True),
    "model: absurd denoiser config": (broken_model(lambda f: _config(f, num_layers=100_000)),
                                      "num_layers=100000 is far beyond any released denoiser", True),
    "model: config not an object": (broken_model(lambda f: (f / "transformer" / "config.json").write_text("[1]")),
                                    "must hold a JSON object", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_refuses_hostile_input_in_one_line(case, flux_folder, tmp_path, capsys, monkeypatch):
    setup, message, early = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    extra = setup(inputs, flux_folder)
    if early:  # proof that nothing heavy ran: loading the pipeline would fail the test
        import segquant.app.quantize_job as job

        monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("the pipeline was loaded"))
    model_before, inputs_before = hashes(flux_folder), hashes(inputs)
    args = ["quantize", "--model", str(flux_folder), "--out", str(tmp_path / "out"), *TINY, *extra]
    start = time.time()
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("segquant:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("segquant: error: "), err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]
    assert hashes(flux_folder) == model_before and hashes(inputs) == inputs_before
    assert not (tmp_path / "out").exists()
    if early:
        assert time.time() - start < 5
