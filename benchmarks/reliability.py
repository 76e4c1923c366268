"""Run the reliability suite (``tests/reliability``) and write its summary: per case class, how many hostile
cases and how many passed, with the suite's wall time.

    python benchmarks/reliability.py          # -> benchmarks/results/reliability.{md,json}

A case class is one test function (its parametrizations are its cases), grouped by the test module it belongs to.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = "tests/reliability"
COMMAND = "python benchmarks/reliability.py"


def run_suite() -> tuple[list[dict], float, int]:
    """Every test case of the suite with its outcome, the wall time and pytest's exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        start = time.time()
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SUITE,
                                f"--junitxml={report}"], cwd=ROOT)
        wall = time.time() - start
        cases = []
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            name = case.get("name", "")
            cases.append({"module": case.get("classname", "").rsplit(".", 1)[-1], "test": name.split("[", 1)[0],
                          "case": name, "outcome": outcome})
    return cases, wall, code


def summarise(cases: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for case in cases:
        groups[(case["module"], case["test"])].append(case)
    return [{"module": module, "case_class": test.removeprefix("test_").replace("_", " "), "cases": len(items),
             "ok": sum(c["outcome"] == "passed" for c in items),
             "skipped": sum(c["outcome"] == "skipped" for c in items)}
            for (module, test), items in groups.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    cases, wall, code = run_suite()
    rows = summarise(cases)
    total, ok = sum(r["cases"] for r in rows), sum(r["ok"] for r in rows)
    meta = {"command": COMMAND, "device": f"CPU ({platform.processor() or platform.machine()}), "
            f"{torch.get_num_threads()} threads", "torch": torch.__version__, "python": platform.python_version(),
            "wall_s": round(wall, 1), "pytest_exit_code": code, "cases": total, "ok": ok,
            "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps({**meta, "classes": rows, "results": cases}, indent=1) + "\n")
    lines = ["# Reliability suite", "",
             f"`{COMMAND}` on {meta['device']}, torch {meta['torch']}, Python {meta['python']}, {meta['date']}: "
             f"{ok} of {total} hostile cases OK in {meta['wall_s']} s (pytest exit code {code}).", "",
             "Each case asserts the message, the exit code where it is a CLI case, and that nothing was lost or "
             "changed (files by hash, models by state dict, module classes and hooks).", "",
             "| module | case class | cases | OK |", "|---|---|---|---|"]
    for row in rows:
        skipped = f" ({row['skipped']} skipped)" if row["skipped"] else ""
        lines.append(f"| {row['module']} | {row['case_class']} | {row['cases']} | {row['ok']}{skipped} |")
    lines.append(f"| **all** | | **{total}** | **{ok}** |")
    (args.out / "reliability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
