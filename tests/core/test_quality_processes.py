"""benchmarks/quality.py with ``--num-gpus 2`` on the CPU (two gloo processes): the (row, seed) jobs are split over
the ranks and gathered by rank 0, and the results equal one process's bit for bit. Both runs use one thread per
process, as torch.distributed.run gives each rank: float reductions then run in the same order."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "quality.py"
TINY = ["--models", "mnist-unet", "--num-samples", "4", "--calib-samples", "2", "--seeds", "2", "--steps", "1",
        "--precisions", "int8_w8a8", "--rows", "torchao int8", "int8_w8a8 baseline", "--no-budget", "--device", "cpu"]


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *TINY, "--out", str(out), *extra], capture_output=True,
                          text=True, timeout=600, env=env)


def model_results(out: Path) -> tuple[dict, dict]:
    result = json.loads((out / "quality.json").read_text())
    model = result["models"]["mnist-unet"]
    for row in model["rows"].values():
        for r in row["runs"]:
            r.pop("seconds", None)
    return result, {k: model[k] for k in ("fp", "rows", "paired", "peer_paired")}


def test_two_processes_give_one_process_results(tmp_path):
    one, two = run(tmp_path / "one"), run(tmp_path / "two", "--num-gpus", "2")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    (result1, model1), (result2, model2) = model_results(tmp_path / "one"), model_results(tmp_path / "two")
    assert set(model1["rows"]) == {"torchao int8 dynamic", "int8_w8a8 baseline"}
    assert [r["seed"] for r in model1["rows"]["int8_w8a8 baseline"]["runs"]] == [0, 1]
    assert model2 == model1  # every run, per-image pairing and interval, bit for bit
    assert result2["environment"]["processes"] == 2 and result1["environment"]["processes"] == 1
    assert len((tmp_path / "two" / "quality_runs.jsonl").read_text().splitlines()) == 3  # written by rank 0 only


def test_bad_process_count_is_refused(tmp_path):
    proc = run(tmp_path, "--num-gpus", "0")
    assert proc.returncode != 0 and "--num-gpus must be at least 1" in proc.stderr
