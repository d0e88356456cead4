"""The project's promises about its own files: documented keys, configs, layout."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedlora.config import KEYS
from fedlora.runtime import parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_doc_lists_every_run_config_key():
    # The run-config reference is the key table of docs/configuration.md: one row per key.
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| `[^`]*` \|", text, re.MULTILINE)
    names = [k.name for k in KEYS]
    assert not [n for n in names if n not in rows], "keys missing from the table"
    assert not [r for r in rows if r not in names], "rows for keys that do not exist"
    assert len(rows) == len(set(rows)), "a key listed twice"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_config_overlays_are_valid(path):
    parse_run_config(tomllib.loads(path.read_text()))


def _imports(folder: str, package: str) -> list[Path]:
    pattern = re.compile(rf"^\s*(from|import)\s+{re.escape(package)}\b", re.MULTILINE)
    return [p for p in (ROOT / folder).rglob("*.py") if pattern.search(p.read_text())]


def test_layering_library_and_apps():
    """The library never imports the Flower apps; the ServerApp and the ClientApp never
    import each other; only the package ``fedlora`` is installed."""
    library = [p for p in (ROOT / "fedlora").rglob("*.py") if "app" not in p.relative_to(ROOT).parts]
    app_import = re.compile(r"^\s*(from|import)\s+fedlora\.app\b|^\s*from\s+\.+app\b", re.MULTILINE)
    assert [p for p in library if app_import.search(p.read_text())] == []
    assert not _imports("fedlora/app/server", "fedlora.app.client")
    assert not _imports("fedlora/app/client", "fedlora.app.server")
    assert not (ROOT / "server").exists() and not (ROOT / "client").exists()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["fedlora*"]


def _package_imports() -> dict[str, set[str]]:
    """Every fedlora module and the fedlora modules it imports, anywhere in its body
    (top level, inside functions, under TYPE_CHECKING)."""
    modules = {}
    for path in (ROOT / "fedlora").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] \
                    if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if sub in modules else module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_package_imports_have_no_circle():
    """A module may import another only if that one does not lead back to it."""
    graph = _package_imports()
    assert len(graph) > 50 and graph["fedlora.runtime"] >= {"fedlora.config", "fedlora.privacy"}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):]
                                                                  + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_ruff_finds_nothing():
    """The lint rules of pyproject.toml ([tool.ruff]) hold everywhere; ruff comes with the
    dev extras, so the suite (and CI, which runs it) checks them."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_imports_inside_functions_are_deferred_on_purpose():
    """An import inside a function of the package defers a heavy or optional dependency and
    says so ("deferred" on its line or the two above; ``cli.py`` says it once for all its
    subcommands); anything else belongs at the top of its module."""
    undeclared = []
    for path in (ROOT / "fedlora").rglob("*.py"):
        source = path.read_text()
        if path.name == "cli.py" and "deferred on purpose" in source:
            continue
        lines = source.splitlines()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    near = lines[max(0, node.lineno - 3):node.lineno]
                    if not any("deferred" in line for line in near):
                        undeclared.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert undeclared == []


def test_one_docstring_style():
    """Docstrings are prose with reST roles (``:func:``, ``:class:``, ````code````): no
    Google (``Args:``) or NumPy (``Parameters`` / ``----``) sections."""
    sections = re.compile(r"^\s+(Args|Arguments|Returns|Raises|Yields|Parameters|Attributes):?\s*$"
                          r"|^\s+-{4,}\s*$", re.MULTILINE)
    found = [str(p.relative_to(ROOT)) for folder in ("fedlora", "simulations")
             for p in (ROOT / folder).rglob("*.py") if sections.search(p.read_text())]
    assert found == []


def test_no_module_over_400_lines():
    """One concept a module: the package, the simulations and the tests stay under 400 lines."""
    long = {str(p.relative_to(ROOT)): n for folder in ("fedlora", "simulations", "tests")
            for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_tests_on_the_fixed_local_superlink_run_one_at_a_time():
    """``scripts/test.sh`` runs the suite in pytest-xdist workers, a module's tests in one
    (``--dist loadfile``); `flwr run` against the local SuperLink uses fixed ports, so only
    one module starts it, and ``local_flwr`` holds a lock that another worker or session
    waits for."""
    from tests import flwr_local

    assert "--dist loadfile" in (ROOT / "scripts" / "test.sh").read_text()
    users = [p.name for p in (ROOT / "tests").glob("test_*.py")
             if "flwr_run(" in p.read_text() and p.name != "test_repo.py"]
    assert users == ["test_e2e.py"]
    with flwr_local.local_flwr(ROOT / ".pytest-lock-probe"):  # (starts no SuperLink)
        probe = subprocess.run(
            [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
             "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(flwr_local.LOCK)],
            capture_output=True, text=True)
    assert probe.returncode != 0 and "BlockingIOError" in probe.stderr  # held meanwhile
