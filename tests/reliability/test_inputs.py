"""Hostile inputs to ``segquant analyze`` and recipes: refused quickly, in one line, naming what to do."""

import json
import os
import time

import pytest

from segquant import SegQuantError
from segquant.app.cli import check_config_size, main
from segquant.recipe import load_recipe

pytest.importorskip("diffusers")

FLUX = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "num_layers": 2,
        "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
        "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6], "guidance_embeds": True}


def analyze(capsys, *argv):
    start = time.time()
    code = main(["analyze", "-q", *map(str, argv)])
    err = capsys.readouterr().err
    return code, err, time.time() - start


@pytest.mark.parametrize("changes, found", [({"num_layers": 100_000}, "num_layers=100000"),
                                            ({"num_single_layers": 5000}, "num_single_layers=5000"),
                                            ({"attention_head_dim": 4096, "num_attention_heads": 512},
                                             "num_attention_heads x attention_head_dim=2097152")])
def test_absurd_configs_are_refused_within_a_second(tmp_path, capsys, changes, found):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**FLUX, **changes}))
    code, err, seconds = analyze(capsys, "--config", path)
    assert code == 2 and found in err and "--allow-large" in err and err.count("\n") == 1 and seconds < 1.0
    check_config_size({**FLUX, **changes}, "x", allow_large=True)  # the override passes the check


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_folder_as_config_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    code, err, seconds = analyze(capsys, "--config", fifo)
    assert code == 2 and "is not a regular file" in err and seconds < 1.0
    code, err, _ = analyze(capsys, "--config", tmp_path)
    assert code == 2 and "is not a regular file" in err


def test_unreadable_configs(tmp_path, capsys):
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    code, err, _ = analyze(capsys, "--config", binary)
    assert code == 2 and "is not valid JSON" in err and "Traceback" not in err
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    code, err, _ = analyze(capsys, "--config", listed)
    assert code == 2 and "must hold a JSON object" in err


def test_json_target_is_checked_before_the_analysis(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**FLUX, "num_layers": 100_000}))  # would be refused later: the target comes first
    code, err, _ = analyze(capsys, "--config", config, "--json", tmp_path / "missing" / "plan.json")
    assert code == 2 and "does not exist" in err
    code, err, _ = analyze(capsys, "--config", config, "--json", tmp_path)
    assert code == 2 and "is a folder" in err
    assert not (tmp_path / "missing").exists()


def test_recipe_with_an_unknown_calibration_key_names_the_known_ones(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# schema: segquant.recipe.Recipe\nbase: mnist-flux/int8_w8a8\ncalibration:\n  stepz: 4\n")
    with pytest.raises(SegQuantError, match="unknown calibration keys \\['stepz'\\]; known: \\['num_prompts', 'steps'"):
        load_recipe(path)
