"""The package's layering, read from the source (ast): application -> library, adapters -> the library's public
names, the library never reaching an adapter or the application, and no import cycles."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("segquant", "segquant_modelopt", "segquant_torchao")
ADAPTERS = ("segquant_modelopt", "segquant_torchao")
APP = "segquant.app"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import, also inside functions; imports under
    ``if TYPE_CHECKING:`` are left out (they never run)."""
    found = []
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def _graph() -> dict[str, dict]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = _module_name(path)
            tree = ast.parse(path.read_text())
            strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            modules[name] = {"imports": _imports(tree, name, path.name == "__init__.py"), "strings": strings}
    return modules


GRAPH = _graph()


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _is_library(name: str) -> bool:
    return _within(name, "segquant") and not _within(name, APP)


def test_the_library_never_reaches_the_application_or_an_adapter():
    assert len([m for m in GRAPH if _is_library(m)]) > 10
    for module, info in GRAPH.items():
        if not _is_library(module):
            continue
        for target, _ in info["imports"]:
            assert not _within(target, APP), f"{module} imports the application ({target})"
            assert not any(_within(target, a) for a in ADAPTERS), f"{module} imports an adapter ({target})"
        named = [s for s in info["strings"] if any(a in s for a in ADAPTERS)]
        assert not named, f"{module} names an adapter: {named}"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapters_use_public_library_names_only(adapter):
    import importlib

    for module, info in GRAPH.items():
        if not _within(module, adapter):
            continue
        for target, names in info["imports"]:
            assert not _within(target, APP), f"{module} imports the application ({target})"
            other = [a for a in ADAPTERS if a != adapter and _within(target, a)]
            assert not other, f"{module} imports another adapter ({target})"
            if not _within(target, "segquant"):
                continue
            assert not any(part.startswith("_") for part in target.split(".")), f"{module}: private module {target}"
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{module} imports private names {private} from {target}"
            library = importlib.import_module(target)
            missing = [n for n in names if n != "*" and not hasattr(library, n)]
            assert not missing, f"{module} imports {missing}, which {target} does not have"


def test_the_application_builds_on_the_library_and_the_backend_registry():
    app = [m for m in GRAPH if _within(m, APP)]
    assert app
    for module in app:
        for target, _ in GRAPH[module]["imports"]:
            assert not any(_within(target, a) for a in ADAPTERS), f"{module} imports an adapter ({target}); " \
                "the application reaches backends through segquant.get_backend"


def _import_edges(graph: dict[str, dict]) -> dict[str, set[str]]:
    """Module -> the modules of ``graph`` its imports run: ``from x import a, b`` runs ``x`` (its ``__init__``)
    and each of ``x.a``, ``x.b`` that is a module; ``import x`` runs ``x``."""
    edges = {}
    for module, info in graph.items():
        targets = set()
        for target, names in info["imports"]:
            targets.update(c for c in [target] + [f"{target}.{n}" for n in names] if c in graph)
        targets.discard(module)
        edges[module] = targets
    return edges


def test_import_edges_record_every_imported_module():
    graph = {"p": {"imports": []}, "p.a": {"imports": []}, "p.b": {"imports": []}, "p.c": {"imports": []},
             "m": {"imports": [("p", ["a", "b", "helper"]), ("p.c", ["f"]), ("os", [])]}}
    assert _import_edges(graph)["m"] == {"p", "p.a", "p.b", "p.c"}
    assert {"segquant.numerics", "segquant.plan"} <= _import_edges(GRAPH)["segquant"]


def test_no_import_cycles():
    edges = _import_edges(GRAPH)
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_no_function_longer_than_a_screen():
    long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 60:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
