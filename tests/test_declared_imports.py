"""Every third-party package that tests/, benchmarks/ or rtsd/ import is declared in pyproject.toml.

A package installed by hand on a developer's machine can stand in for a missing install step (it happened: scipy,
which diffusers' LMS scheduler needs, was on the CI machine but in no extra). `.ci/run` now installs into a fresh
virtual environment, which catches indirect needs; this test catches direct ones without an install: it reads the
imports (and `pytest.importorskip` names) of every module and checks each against the requirements of the project's
dependencies and extras. Imports guarded by `except ImportError` in rtsd/ are optional by design and exempt.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tests", "benchmarks", "rtsd")

# Import names whose distribution has another name, for packages that may not be installed here (GPU-only ones).
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "cupy": "cupy-cuda12x",
    "cuda": "cuda-python",
    "onnx_graphsurgeon": "onnx-graphsurgeon",
    "google": "protobuf",
    "pytriton": "nvidia-pytriton",
}
# Modules no package installs: the host process provides them (Triton's Python backend injects this one).
PROVIDED_BY_HOST = {"triton_python_backend_utils"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli there
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared_distributions() -> set[str]:
    project = _pyproject()["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    names = set()
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        assert match, f"unparsable requirement {requirement!r} in pyproject.toml"
        names.add(_normalize(match.group(1)))
    return names


def _is_guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """True when the import sits in a `try:` whose handlers catch ImportError / ModuleNotFoundError."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                caught = handler.type
                names = [caught] if not isinstance(caught, ast.Tuple) else list(caught.elts)
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
    return False


def imported_modules(path: Path, exempt_guarded: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "importorskip" and node.args and isinstance(node.args[0], ast.Constant)):
            names = [node.args[0].value]
        if names and not (exempt_guarded and _is_guarded(node, parents)):
            found.update(name.split(".")[0] for name in names)
    return found


def _local_modules() -> set[str]:
    local = {"rtsd", "tests", "benchmarks"}
    for folder in SCANNED:
        for path in (ROOT / folder).rglob("*.py"):
            local.add(path.stem)
        local.update(p.name for p in (ROOT / folder).rglob("*") if p.is_dir())
    return local


def undeclared_imports(extra_files: tuple[Path, ...] = ()) -> dict[str, list[str]]:
    declared = declared_distributions()
    installed = metadata.packages_distributions()
    local = _local_modules()
    files = [(path, folder == "rtsd") for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))]
    files += [(path, False) for path in extra_files]
    missing: dict[str, list[str]] = {}
    for path, exempt_guarded in files:
        for module in imported_modules(path, exempt_guarded):
            if module in sys.stdlib_module_names or module in local or module in PROVIDED_BY_HOST:
                continue
            candidates = {_normalize(d) for d in installed.get(module, [])}
            candidates |= {_normalize(DISTRIBUTION_OF.get(module, module))}
            if not candidates & declared:
                missing.setdefault(module, []).append(path.name)
    return missing


def test_every_import_is_declared_by_an_extra():
    missing = undeclared_imports()
    assert not missing, "imported but declared in no extra of pyproject.toml: " + "; ".join(
        f"{module} ({', '.join(paths[:3])})" for module, paths in sorted(missing.items()))


def test_the_checker_sees_an_undeclared_import(tmp_path):
    """The check itself can fail: a module importing a package no extra names is reported, by name and file."""
    probe = tmp_path / "probe_module.py"
    probe.write_text("import definitely_not_declared_pkg.sub\nimport numpy\nimport pytest\n"
                     "pytest.importorskip('another_undeclared_pkg')\n")
    missing = undeclared_imports(extra_files=(probe,))
    assert missing.get("definitely_not_declared_pkg") == ["probe_module.py"]
    assert missing.get("another_undeclared_pkg") == ["probe_module.py"]
    assert "numpy" not in missing and "pytest" not in missing


def test_guarded_imports_in_rtsd_are_optional(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("try:\n    import yaml_optional\nexcept ImportError:\n    yaml_optional = None\nimport plain\n")
    assert imported_modules(source, exempt_guarded=True) == {"plain"}
    assert imported_modules(source, exempt_guarded=False) == {"yaml_optional", "plain"}
