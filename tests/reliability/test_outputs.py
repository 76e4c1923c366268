"""Nothing lost: output folders are checked before any work, never clobber inputs or the user's files, and a
failed or interrupted write leaves the previous complete state (files compared by hash)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import segquant  # noqa: E402
from segquant import SegQuantError  # noqa: E402
from segquant.app.cli import main  # noqa: E402
from segquant.app.outputs import OWNER_FILE, check_output_folder, staged_output  # noqa: E402
from segquant.files import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--dtype", "float32", "--device", "cpu", "--num-prompts", "1", "--steps", "1", "--height", "32",
        "--width", "32", "--no-progress"]


def hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) by its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


class FakeSave:
    """Stands in for a backend's quantize_and_save: writes one file (``content``), or a fragment and fails."""

    def __init__(self, content="v1", fail: BaseException | None = None):
        self.content, self.fail = content, fail

    def __call__(self, model, plan, options, forward_loop, folder, name):
        path = Path(folder) / f"{name}.fake.pth"
        path.write_text(self.content if self.fail is None else "fragment")
        if self.fail is not None:
            raise self.fail
        return model, [path]


@pytest.fixture
def fake_backend(monkeypatch):
    backend = segquant.get_backend("modelopt")
    cls = type(backend)

    def install(save: FakeSave, onnx_error: BaseException | None = None):
        monkeypatch.setattr(cls, "quantize_and_save", lambda self, *a: save(*a))
        if onnx_error is not None:
            def export(self, model, inputs, path, mode="tensorrt"):
                Path(path).write_text("half an onnx")
                raise onnx_error
            monkeypatch.setattr(cls, "export_onnx", export)
    return install


def quantize(flux_folder, out, *extra):
    return main(["quantize", "--model", str(flux_folder), "--out", str(out), *TINY, *extra])


@pytest.mark.parametrize("where", ["the model folder", "inside the model", "around the model"])
def test_out_never_overlaps_the_model(flux_folder, tmp_path, where, capsys):
    before = hashes(flux_folder)
    out = {"the model folder": flux_folder, "inside the model": flux_folder / "transformer" / "q",
           "around the model": flux_folder.parent}[where]
    assert quantize(flux_folder, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "choose a folder outside the model" in err and err.count("\n") == 1  # checked before loading anything
    assert hashes(flux_folder) == before


def test_a_folder_of_the_users_files_is_refused_unless_overwrite(flux_folder, tmp_path, fake_backend, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = hashes(out)
    fake_backend(FakeSave("v1"))
    assert quantize(flux_folder, out) == 2
    assert "holds files this command did not write" in capsys.readouterr().err
    assert hashes(out) == before
    assert quantize(flux_folder, out, "--overwrite") == 0
    assert not (out / "notes.txt").exists() and (out / "segquant.json").is_file()


def test_an_earlier_checkpoint_is_replaced_only_when_the_new_one_is_complete(flux_folder, tmp_path, fake_backend):
    out = tmp_path / "ckpt"
    fake_backend(FakeSave("v1"))
    assert quantize(flux_folder, out) == 0
    v1 = hashes(out)
    assert (out / OWNER_FILE).read_text().strip() == "segquant quantize"
    for failure in (OSError(28, "No space left on device"), KeyboardInterrupt(), RuntimeError("bug")):
        fake_backend(FakeSave("v2", fail=failure))
        assert quantize(flux_folder, out) in (1, 2, 130)
        assert hashes(out) == v1, failure
        assert leftovers(tmp_path) == []
    fake_backend(FakeSave("v2"))
    assert quantize(flux_folder, out) == 0  # our own earlier output: replaced without --overwrite
    assert (out / "transformer.fake.pth").read_text() == "v2" and leftovers(tmp_path) == []


def test_a_failed_onnx_export_leaves_no_checkpoint_without_a_manifest(flux_folder, tmp_path, fake_backend, capsys):
    out = tmp_path / "onnx"
    fake_backend(FakeSave("v1"), onnx_error=SegQuantError("onnx is not installed"))
    assert quantize(flux_folder, out, "--onnx") == 2
    assert "onnx is not installed" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_ctrl_c_prints_one_line_and_exits_130(flux_folder, tmp_path, fake_backend, capsys):
    fake_backend(FakeSave(fail=KeyboardInterrupt()))
    assert quantize(flux_folder, tmp_path / "x") == 130
    err = capsys.readouterr().err  # diffusers' loading bars, then our one line
    assert err.strip().splitlines()[-1] == "segquant: interrupted (outputs left as they were)"
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_run_does_not_overwrite_the_users_report(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("my report")
    (out / "metrics.json").write_text("{}")
    before = hashes(out)
    start = time.time()
    assert main(["run", "--out", str(out), "-q"]) == 2
    assert time.time() - start < 10  # refused before any model is loaded
    assert "holds files this command did not write" in capsys.readouterr().err
    assert hashes(out) == before
    (tmp_path / "file").write_text("x")
    assert main(["run", "--out", str(tmp_path / "file"), "-q"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_check_output_folder_cases(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", [], "segquant run", False) == (tmp_path / "empty").resolve()
    assert check_output_folder(tmp_path / "new", ["org/hub-id"], "segquant run", False) == (tmp_path / "new").resolve()
    with pytest.raises(SegQuantError, match="parent folder .* does not exist"):
        check_output_folder(tmp_path / "no" / "such" / "out", [], "segquant run", False)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / OWNER_FILE).write_text("segquant quantize\n")
    (earlier / "x").write_text("x")
    with pytest.raises(SegQuantError, match="did not write"):  # another command's output is not ours to replace
        check_output_folder(earlier, [], "segquant run", False)
    assert check_output_folder(earlier, [], "segquant quantize", False) == earlier.resolve()


def test_staged_output_keeps_the_old_folder_on_failure(tmp_path):
    out = tmp_path / "out"
    with staged_output(out, "segquant run") as stage:
        (stage / "a").write_text("1")
    before = hashes(out)
    with pytest.raises(ZeroDivisionError):
        with staged_output(out, "segquant run") as stage:
            (stage / "a").write_text("2")
            1 / 0
    assert hashes(out) == before and leftovers(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    plan = segquant.SegQuantPlan(layers={})
    plan.save(path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        plan.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    with pytest.raises(SegQuantError, match="is a folder"):
        atomic_write_text(tmp_path, "x")
    with pytest.raises(SegQuantError, match="does not exist"):
        atomic_write_text(tmp_path / "nope" / "f.json", "x")


def test_interrupting_a_save_in_another_process(flux_folder, tmp_path, fake_backend):
    """SIGINT while the checkpoint is being written: exit 130, the previous checkpoint intact, no fragments."""
    out = tmp_path / "ckpt"
    fake_backend(FakeSave("v1"))
    assert quantize(flux_folder, out) == 0
    # the child takes Ctrl-C as a terminal's process does, also when the tests run where SIGINT is ignored (a
    # background job of a shell: Python then installs no KeyboardInterrupt handler, and the signal did nothing)
    script = textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import segquant
        from segquant.app.cli import main
        cls = type(segquant.get_backend("modelopt"))
        content = "slow"

        def save(self, model, plan, options, loop, folder, name):
            path = Path(folder) / (name + ".fake.pth")
            path.write_text(content)
            if content == "slow":
                print("SAVING", flush=True)
                time.sleep(60)
            return model, [path]

        cls.quantize_and_save = save
        sys.exit(main(["quantize", "--model", {str(flux_folder)!r}, "--out", {str(out)!r}, *{TINY!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    before = hashes(out)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "SAVING":
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "segquant: interrupted" in err
    assert hashes(out) == before and leftovers(tmp_path) == []
    assert json.loads((out / "segquant.json").read_text())["files"] == ["transformer.fake.pth", "plan.json"]
