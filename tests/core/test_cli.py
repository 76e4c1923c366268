import json
import subprocess
import sys

import pytest

from segquant import SegQuantPlan
from segquant.app.cli import main
from segquant.plan import PLAN_VERSION
from full_configs import FLUX_1_DEV

pytest.importorskip("diffusers")


def test_analyze_default_bundled_model(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["analyze", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SegQuant plan for FluxTransformer2DModel (export)" in text
    assert "single_transformer_blocks.1.proj_out" in text and f"wrote {out}" in text
    data = json.loads(out.read_text())
    assert data["version"] == PLAN_VERSION and data["model_class"] == "FluxTransformer2DModel"
    layer = data["layers"]["single_transformer_blocks.0.proj_out"]
    assert layer["in_segments"] == [32, 128] and layer["dual_scale_segments"] == [1]
    assert SegQuantPlan.load(out).summary() == ("7 output-segmented, 4 input-segmented, 16 DualScale of 50 Linear, "
                                                "1 kept in high precision")  # the output layer


@pytest.mark.slow
def test_analyze_full_config_file(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FLUX_1_DEV))
    out = tmp_path / "plan.json"
    assert main(["analyze", "--model-class", "FluxTransformer2DModel", "--config", str(config),
                 "--json", str(out), "-q"]) == 0
    assert capsys.readouterr().out == ""
    plan = SegQuantPlan.load(out)
    assert len(plan.input_segmented()) == 40 and len(plan.output_segmented()) == 77


def test_analyze_model_folder(tmp_path, capsys):
    from _models import build_tiny

    build_tiny("SD3Transformer2DModel").save_pretrained(tmp_path / "pipe" / "transformer")
    assert main(["analyze", "--model-dir", str(tmp_path / "pipe"), "--all-layers"]) == 0
    text = capsys.readouterr().out
    assert "SD3Transformer2DModel" in text and "transformer_blocks.0.attn.to_q" in text


@pytest.mark.parametrize("argv, message", [
    (["analyze", "--config", "missing.json"], "config file missing.json does not exist"),
    (["analyze", "--model", "flux-9"], "unknown bundled model 'flux-9'"),
    (["analyze", "--model-dir", "."], "no config.json in the folder"),
    (["analyze", "--model-class", "NotAModel"], "NotAModel is not a diffusers model class"),
])
def test_analyze_bad_input(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_analyze_bad_config_contents(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["analyze", "--config", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"num_layers": 1}))
    assert main(["analyze", "--config", str(bad)]) == 2
    assert "has no _class_name; pass --model-class" in capsys.readouterr().err
    bad.write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "attention_head_dim": "big"}))
    assert main(["analyze", "--config", str(bad)]) == 2
    assert "could not build FluxTransformer2DModel" in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "segquant.app", "analyze", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
