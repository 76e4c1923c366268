"""pyproject.toml against the code: every third-party import is declared, lower bounds are at least what the
declared dependencies themselves demand, the libraries whose private names the adapters use are capped at a
minor version, and each command's one-line "missing dependency" error names an extra that installs it."""

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from segquant import SegQuantError
from segquant.app import extras

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OWN = {"segquant", "segquant_modelopt", "segquant_torchao", "segquant_recipes"}
SOURCES = ["segquant", "segquant_modelopt", "segquant_torchao"]
# imported only when present: the Triton GEMM (CUDA builds of torch ship triton); FlashAttention-3 (no wheel: built
# from source, benchmarks/fa3_build.py, and loaded by segquant_torchao.fa3_attention.load_fa3)
OPTIONAL_KERNELS = {"triton", "flash_attn_3"}


def requirements(extra: str | None = None, seen: frozenset = frozenset()) -> dict[str, Requirement]:
    """The requirements of the core (``extra`` None) or of an extra, with ``segquant[...]`` expanded."""
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    out = {}
    for text in listed:
        req = Requirement(text)
        if canonicalize_name(req.name) == "segquant":
            for sub in sorted(req.extras - seen):
                out.update(requirements(sub, seen | {sub}))
        else:
            out[canonicalize_name(req.name)] = req
    return out


def all_declared() -> dict[str, Requirement]:
    out = requirements()
    for extra in PROJECT["optional-dependencies"]:
        out.update(requirements(extra))
    return out


def lower_bound(spec: SpecifierSet) -> Version | None:
    bounds = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
    return max(bounds) if bounds else None


def imported_top_level_modules() -> set[str]:
    names = set()
    for package in SOURCES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - OWN - {"__future__"}


def test_every_third_party_import_is_declared():
    dists = md.packages_distributions()
    declared = set(all_declared())
    undeclared = []
    for module in sorted(imported_top_level_modules() - OPTIONAL_KERNELS):
        names = {canonicalize_name(d) for d in dists.get(module, [extras.DISTRIBUTIONS.get(module, module)])}
        if not names & declared:
            undeclared.append(f"{module} ({', '.join(sorted(names))})")
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


def test_lower_bounds_cover_what_the_dependencies_demand():
    """If a declared dependency requires another declared one at version >= v, our bound is >= v too, and the
    Python bound is at least every dependency's Requires-Python."""
    declared = all_declared()
    too_low = []
    ours_python = lower_bound(SpecifierSet(PROJECT["requires-python"]))
    for name in declared:
        try:
            meta = md.metadata(name)
        except md.PackageNotFoundError:
            continue  # not installed here (e.g. triton off Linux): nothing to compare with
        theirs = lower_bound(SpecifierSet(meta.get("Requires-Python") or ""))
        if theirs and theirs > ours_python:
            too_low.append(f"python: ours {ours_python}, {name} needs {theirs}")
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and "extra" in str(req.marker):
                continue
            dep = canonicalize_name(req.name)
            if dep in declared:
                needed, ours = lower_bound(req.specifier), lower_bound(declared[dep].specifier)
                if needed and (ours is None or ours < needed):
                    too_low.append(f"{dep}: ours {ours}, {name} needs >= {needed}")
    assert not too_low, too_low


def test_installed_versions_satisfy_the_declared_ranges():
    wrong = []
    for name, req in all_declared().items():
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            continue
        if req.marker is None or req.marker.evaluate():
            if not req.specifier.contains(version, prereleases=True) and \
                    not req.specifier.contains(Version(version).base_version, prereleases=True):
                wrong.append(f"{name} {version} not in {req.specifier}")
    assert not wrong, wrong


def private_names_used() -> dict[str, set[str]]:
    """Private names of ModelOpt and torchao that the adapters import or patch."""
    found: dict[str, set[str]] = {"nvidia-modelopt": set(), "torchao": set()}
    pattern = re.compile(r"from (modelopt|torchao)[\w.]* import ([^\n]+)")
    for package in ("segquant_modelopt", "segquant_torchao"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for library, names in pattern.findall(text):
                dist = "nvidia-modelopt" if library == "modelopt" else "torchao"
                found[dist] |= {n for n in re.findall(r"\b(_[A-Za-z]\w*)", names)}
            for name in re.findall(r'"(_export_\w+_checkpoint)"', text):
                found["nvidia-modelopt"].add(name)
    return found


def test_libraries_whose_private_names_we_use_are_capped_at_a_minor_version():
    used = private_names_used()
    assert used["torchao"] and used["nvidia-modelopt"], used  # the scan sees what it should
    declared = all_declared()
    for name in used:
        spec = declared[name].specifier
        lower = lower_bound(spec)
        caps = [Version(s.version) for s in spec if s.operator == "<"]
        assert caps, f"{name} has no upper cap; the adapters use its private names {sorted(used[name])}"
        assert min(caps) <= Version(f"{lower.major}.{lower.minor + 1}"), f"{name}: cap {min(caps)} beyond one minor"


@pytest.mark.parametrize("extra", sorted(extras.EXTRA_MODULES))
def test_each_commands_extra_installs_what_the_command_checks(extra):
    installed = set(requirements(extra))
    needed = {canonicalize_name(extras.DISTRIBUTIONS[m]) for m in extras.EXTRA_MODULES[extra]}
    assert needed <= installed, f"segquant[{extra}] lacks {sorted(needed - installed)}"


def test_python_bound_matches_the_classifier_free_floor():
    assert lower_bound(SpecifierSet(PROJECT["requires-python"])) >= Version("3.11")


def test_missing_dependency_is_one_line_naming_the_extra(monkeypatch):
    real = extras.importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda m: None if m == "transformers" else real(m))
    with pytest.raises(SegQuantError) as info:
        extras.require("quantize", "segquant quantize")
    assert str(info.value) == ("segquant quantize needs transformers, which is not installed: "
                               "pip install 'segquant[quantize]'")
    with pytest.raises(SegQuantError, match="unknown extra 'nope'"):
        extras.require("nope", "x")


def test_cli_quantize_without_transformers_says_which_extra(monkeypatch, tmp_path, capsys):
    from segquant.app.cli import main

    real = extras.importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda m: None if m == "transformers" else real(m))
    assert main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["segquant: error: segquant quantize needs transformers, which is not installed: "
                   "pip install 'segquant[quantize]'"]
