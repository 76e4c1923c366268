"""benchmarks/fp8_attention_quality.py end to end on the CPU with a tiny budget (2 images, 1 seed, 1 step)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fp8_attention_quality.py"


def test_script_writes_rows_and_paired_intervals(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--num-samples", "2", "--calib-samples", "2", "--seeds", "1",
                           "--steps", "1", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "fp8_attention_quality.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"full precision + fp8 attention", "fp8 recipe", "fp8 recipe + fp8 attention",
                         "fp8 recipe + fp8 attention, K not centred", "fp8 recipe + fp8 attention, P in float",
                         "fp8 recipe + fp8 attention, per-tensor scales", "fp8 recipe + int8 QK per-block, fp8 PV",
                         "fp8 recipe + int8 QK per-block, PV in float",
                         "fp8 recipe + ModelOpt fp8 attention (static per-tensor Q, K, V)"}
    assert all(10 < r["psnr_db_mean"] < 100 for r in rows.values())
    assert rows["fp8 recipe"]["psnr_db_mean"] != rows["fp8 recipe + fp8 attention"]["psnr_db_mean"]
    modelopt = rows["fp8 recipe + ModelOpt fp8 attention (static per-tensor Q, K, V)"]["psnr_db_mean"]
    assert modelopt != rows["fp8 recipe"]["psnr_db_mean"]  # ModelOpt's attention quantizers did quantize
    for p in result["paired"]:
        assert p["low"] <= p["mean"] <= p["high"] and p["n"] == 2  # 2 images x 1 seed
    assert "| fp8 recipe + fp8 attention | fp8 recipe |" in (tmp_path / "fp8_attention_quality.md").read_text()


def test_bad_sample_count_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--num-samples", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--num-samples must be >= 2" in proc.stderr
