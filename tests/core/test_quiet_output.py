"""What the commands write, with output going to files (not a terminal): at the default verbosity our results on
stdout and one plain line per long step on stderr, no library warnings, prints or log records, no escape codes
or carriage returns; ``-v`` shows more, ``-q`` nothing; ``-q``/``-v`` before and after every subcommand;
``segquant --version``; ``segquant recipes``."""

import io
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from segquant import PRECISIONS, __version__
from segquant.app.cli import build_parser, main, version
from segquant.app.console import NORMAL, QUIET, VERBOSE, Progress, command_output
from segquant.recipe import bundled_recipes

TINY_ARGS = ["--dtype", "float32", "--device", "cpu", "--num-prompts", "2", "--steps", "2", "--height", "32",
             "--width", "32"]
STEP_LINE = re.compile(r"^[\w ./:+-]+: \d+(/\d+)? \w+ in \d+\.\d s$")
"""A plain progress line: ``calibrating segquant: 1/1 step in 2.3 s``."""


def assert_clean(text):
    assert "\x1b[" not in text, "escape code in the output"
    assert "\r" not in text, "carriage return (a progress bar) in the output"
    assert [line for line in text.splitlines() if re.search("warn", line, re.I)] == []


def assert_progress_lines_only(err):
    assert [line for line in err.splitlines() if not STEP_LINE.match(line)] == []


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from _models import build_tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("flux")
    build_tiny_flux_pipeline(folder)
    return folder


def test_quantize_default_output_in_a_fresh_process(flux_folder, tmp_path):
    """A new interpreter: the import-time warnings of torchao, diffusers, transformers and ModelOpt included."""
    pytest.importorskip("modelopt.torch.quantization")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "segquant.app", "quantize", "--model", str(flux_folder), "--out",
                           str(out), *TINY_ARGS], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert_clean(done.stdout + done.stderr)
    assert "quantized " in done.stdout and f"wrote {out / 'segquant.json'}" in done.stdout
    assert "Inserted" not in done.stdout  # ModelOpt's print is an INFO record now
    assert_progress_lines_only(done.stderr)
    assert [line.split(":")[0] for line in done.stderr.splitlines()] == [f"loading {flux_folder}",
                                                                         "calibration prompts"]


def test_quantize_verbose_and_quiet(flux_folder, tmp_path, capfd):
    pytest.importorskip("modelopt.torch.quantization")
    assert main(["quantize", "--model", str(flux_folder), "--out", str(tmp_path / "v"), *TINY_ARGS, "-v"]) == 0
    out, err = capfd.readouterr()
    assert "quantized " in out
    assert "INFO segquant_modelopt.backend: modelopt: Inserted" in err  # ModelOpt's print, as a log record
    assert "INFO segquant.app.quantize_job: calibrating" in err
    assert main(["-q", "quantize", "--model", str(flux_folder), "--out", str(tmp_path / "q"), *TINY_ARGS]) == 0
    assert capfd.readouterr() == ("", "")
    assert (tmp_path / "q" / "segquant.json").is_file()


def test_run_default_output(tmp_path, capfd):
    pytest.importorskip("modelopt")
    pytest.importorskip("matplotlib")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # whatever the test runner's filters: the command's own decide
        assert main(["run", "--num-samples", "1", "--calib-samples", "1", "--steps", "1",
                     "--out", str(tmp_path / "report")]) == 0
    out, err = capfd.readouterr()
    assert_clean(out + err)
    assert "Inserted" not in out and "Smoothed" not in out  # ModelOpt's prints
    assert len(out.splitlines()) == 6 and out.splitlines()[-1].startswith("report: ")  # 5 rows and the folder
    assert_progress_lines_only(err)
    assert [line.split(":")[0] for line in err.splitlines()] == [
        "sampling full precision", "calibrating baseline", "sampling baseline", "calibrating techniques_off",
        "sampling techniques_off", "calibrating segquant", "sampling segquant", "calibrating segquant_dual_scale",
        "sampling segquant_dual_scale"]  # one per step, none nested


@pytest.mark.parametrize("command", [["analyze"], ["quantize", "--model", "m", "--out", "o"], ["run"], ["recipes"]])
def test_quiet_and_verbose_before_and_after_every_subcommand(command):
    parser = build_parser()
    for flag, key in (("-q", "quiet"), ("--quiet", "quiet"), ("-v", "verbose"), ("--verbose", "verbose")):
        after, before = parser.parse_args([*command, flag]), parser.parse_args([flag, *command])
        assert getattr(after, key) and getattr(before, key)
    plain = parser.parse_args(command)
    assert not plain.quiet and not plain.verbose
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "-q", "-v"])


def test_quiet_and_verbose_together_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["-v", "recipes", "-q"])
    assert exit_info.value.code == 2 and "give one of them" in capsys.readouterr().err


def test_no_progress_is_kept_for_quantize():
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--no-progress"])
    assert args.no_progress and not args.quiet


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"segquant {version()}\n"
    assert version() == __version__


def test_recipes_lists_every_bundled_recipe_and_precision(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "/" in line.split(" ")[0]}
    assert set(rows) == set(bundled_recipes())
    assert rows["mnist-flux/int8_w8a8"][1:3] == ["FluxTransformer2DModel", "int8_w8a8"]
    assert rows["sdxl-base/fp8"][1:3] == ["UNet2DConditionModel", "fp8"]
    listed = out.split("precisions")[1]
    assert all(re.search(rf"^  {p} ", listed, re.M) for p in PRECISIONS)
    assert main(["recipes", "-q"]) == 0 and capsys.readouterr().out == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_one_line_otherwise():
    log = io.StringIO()
    with Progress("calibrating", total=3, unit="batch", stream=log) as bar:
        for _ in range(3):
            bar.update()
    assert STEP_LINE.match(log.getvalue().rstrip("\n")) and log.getvalue().startswith("calibrating: 3/3 batches in")
    terminal = _Terminal()
    with Progress("calibrating", total=3, unit="batch", stream=terminal) as bar:
        bar.update(3)
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()  # tqdm
    off = io.StringIO()
    with Progress("calibrating", total=3, stream=off, enabled=False) as bar:
        bar.update(3)
    assert off.getvalue() == ""
    failed = io.StringIO()
    with pytest.raises(RuntimeError), Progress("loading", stream=failed):
        raise RuntimeError("the error says what happened")
    assert failed.getvalue() == ""


@pytest.mark.parametrize("verbosity", [QUIET, NORMAL, VERBOSE])
def test_command_output_puts_everything_back(verbosity):
    loggers = ["segquant", "torch", "diffusers"]
    levels = [logging.getLogger(n).level for n in loggers]
    filters, handlers = list(warnings.filters), list(logging.getLogger().handlers)
    env = {k: os.environ.get(k) for k in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    with command_output(verbosity):
        assert logging.getLogger("torch").level == (logging.ERROR if verbosity < VERBOSE else levels[1])
    assert [logging.getLogger(n).level for n in loggers] == levels
    assert list(warnings.filters) == filters and logging.getLogger().handlers == handlers
    assert {k: os.environ.get(k) for k in env} == env


def test_default_verbosity_keeps_our_warnings_and_drops_the_libraries(capfd):
    with warnings.catch_warnings(record=True) as caught, command_output(NORMAL):
        warnings.warn_explicit("from a library", UserWarning, "lib.py", 1, module="diffusers.models")
        warnings.warn_explicit("from segquant", UserWarning, "plan.py", 1, module="segquant.plan")
        logging.getLogger("torchao").warning("a library record")
        logging.getLogger("segquant.graph").warning("our record")
    assert [str(w.message) for w in caught] == ["from segquant"]
    err = capfd.readouterr().err
    assert "our record" in err and "a library record" not in err



def test_a_reader_that_leaves_early_is_no_error(monkeypatch, capfd):
    """``segquant recipes | head -1``: writing to a closed pipe ends the command quietly with exit code 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        assert main(["recipes"]) == 0
    finally:
        monkeypatch.undo()
        try:
            closed.close()
        except BrokenPipeError:
            pass
    assert capfd.readouterr().err == ""
