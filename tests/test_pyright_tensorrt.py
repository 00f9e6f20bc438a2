"""Type-check rtsd's TensorRT calls against TensorRT 10's type stubs with pyright (issue 17, item 6).

TensorRT cannot run where rtsd is developed, so a misspelt method, a wrong argument or a forgotten ``None`` check
in the TensorRT path would first show on a user's GPU. The stubs (``tensorrt-stubs``, generated from TensorRT
10.13's bindings) describe every class and signature; pyright checks the TensorRT modules against them here.

Needs ``pyright`` (dev extra) and ``tensorrt-stubs`` installed with ``pip install --no-deps`` (its dependencies are
TensorRT itself). Both are installed in CI; elsewhere the tests skip, in CI (CI=true) they fail instead.

Two checks:
- ``test_tensorrt_modules_type_check``: zero pyright errors beyond ``ALLOWED``, the stubs' known false positives,
  each explained, each still needed (an entry that matches nothing fails too, so the list stays short and true).
- ``test_pyright_sees_the_tensorrt_calls_typed``: how many TensorRT calls pyright actually resolves. Each call
  ``x.name(...)`` in the TensorRT modules is renamed to ``x.name_rtsdprobe(...)`` in a scratch copy; pyright then
  reports the call as an unknown attribute exactly when it knows the type of ``x``. Counting the reports that name
  a TensorRT class or the ``tensorrt`` module counts the typed TensorRT calls (an untyped call, e.g. on a parameter
  without annotation, would be silently accepted and not counted).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every rtsd module that imports TensorRT (found by its lazy import), plus the CUDA layer it runs on.
TENSORRT_MODULES = sorted({ROOT / "rtsd" / "engine" / "cuda.py"} | {
    path for path in (ROOT / "rtsd").rglob("*.py")
    if "import_tensorrt(" in path.read_text() or re.search(r"^\s*import tensorrt\b", path.read_text(), re.M)})

# (rule, message pattern, why it is a false positive of the stubs and not a bug). Patterns match pyright's first line.
ALLOWED = [
    ("reportArgumentType",
     r'^Argument of type "tuple\[int, \.\.\.\]" cannot be assigned to parameter "(min|opt|max)" of type "Dims" '
     r'in function "set_shape"$',
     "IOptimizationProfile.set_shape takes Dims; the bindings register tuples as implicitly convertible to Dims "
     "(TensorRT's own samples pass tuples), which the generated stubs cannot express"),
    ("reportArgumentType",
     r'^Argument of type "Dims" cannot be assigned to parameter "iterable" of type "Iterable\[_T_co@tuple\]" in '
     r'function "__new__"$',
     "tuple(dims): Dims is a sequence at run time (__len__ and __getitem__, so Python iterates it), but the stub "
     "declares no __iter__; used once, in rtsd.engine.tensorrt.dims_tuple"),
]
# Typed TensorRT calls counted when this check was written (see the module docstring); typing may only grow.
MIN_TYPED_TENSORRT_CALLS = 43  # of the 43 TensorRT calls in these modules at the time


def _tools_or_skip():
    missing = [name for name, found in (("pyright", shutil.which("pyright") or importlib.util.find_spec("pyright")),
                                        ("tensorrt-stubs", _stub_file())) if not found]
    if missing:
        message = f"{', '.join(missing)} not installed (pip install pyright; pip install --no-deps tensorrt-stubs)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _stub_file() -> Path | None:
    for entry in sys.path:
        candidate = Path(entry) / "tensorrt_bindings" / "tensorrt.pyi"
        if candidate.is_file():
            return candidate
    return None


def _pyright(paths: list[Path]) -> list[dict]:
    """pyright's diagnostics (errors and warnings) for ``paths``, run with this interpreter's site-packages."""
    command = [sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable, *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"pyright did not run: {result.stdout[-2000:]}{result.stderr[-2000:]}") from None
    return [d for d in report["generalDiagnostics"] if d["severity"] in ("error", "warning")]


def _where(diagnostic: dict) -> str:
    line = diagnostic["range"]["start"]["line"] + 1
    path = Path(diagnostic["file"])
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"


def test_tensorrt_modules_type_check():
    _tools_or_skip()
    diagnostics = _pyright(TENSORRT_MODULES)
    used, unexplained = set(), []
    for diagnostic in diagnostics:
        first_line = diagnostic["message"].splitlines()[0]
        match = next((i for i, (rule, pattern, _) in enumerate(ALLOWED)
                      if diagnostic.get("rule") == rule and re.search(pattern, first_line)), None)
        if match is None:
            unexplained.append(f"{_where(diagnostic)}: {first_line} ({diagnostic.get('rule')})")
        else:
            used.add(match)
    assert not unexplained, "pyright errors in the TensorRT modules:\n" + "\n".join(unexplained)
    stale = [ALLOWED[i][1] for i in range(len(ALLOWED)) if i not in used]
    assert not stale, f"allow-list entries that no longer match anything (remove them): {stale}"


def _probe_copy(source: str, chained: bool, tensorrt_names: set[str]) -> str:
    """``source`` with each attribute call whose name TensorRT's stubs define renamed to ``name_rtsdprobe``: calls on
    a plain receiver (``chained`` False) or calls on the result of another call (``chained`` True), so no renamed
    call hides another (rtsd's own calls keep their names, so their results keep their types)."""
    tree = ast.parse(source)
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in tensorrt_names:
            on_call = any(isinstance(n, ast.Call) for n in ast.walk(node.func.value))
            if on_call == chained:
                edits.append((node.func.end_lineno, node.func.end_col_offset))
    lines = source.splitlines(keepends=True)
    for lineno, col in sorted(edits, reverse=True):
        line = lines[lineno - 1].encode()
        lines[lineno - 1] = (line[:col] + b"_rtsdprobe" + line[col:]).decode()
    return "".join(lines)


def test_pyright_sees_the_tensorrt_calls_typed(tmp_path, capsys):
    _tools_or_skip()
    stub = _stub_file()
    # (a regex, not ast: the generated stub is not valid Python everywhere, e.g. add_scale_nd's argument order)
    stub_text = stub.read_text()
    tensorrt_classes = set(re.findall(r"^class (\w+)", stub_text, re.M))
    tensorrt_names = tensorrt_classes | set(re.findall(r"^\s*def (\w+)", stub_text, re.M)) | {"nptype"}
    probes = []
    for module in TENSORRT_MODULES:
        for chained in (False, True):
            probe = tmp_path / f"{module.parent.name}_{module.stem}_{'chained' if chained else 'plain'}.py"
            probe.write_text(_probe_copy(module.read_text(), chained, tensorrt_names))
            probes.append(probe)
    typed = set()
    for diagnostic in _pyright(probes):
        message = diagnostic["message"].splitlines()[0]
        found = re.search(r'attribute "(\w+)_rtsdprobe" for class "(\w+)"', message) or \
            re.search(r'"(\w+)_rtsdprobe" is not a known attribute of module "(tensorrt)"', message)
        if found and (found.group(2) in tensorrt_classes or found.group(2) == "tensorrt"):
            typed.add((Path(diagnostic["file"]).name, diagnostic["range"]["start"]["line"], found.group(1),
                       found.group(2)))
    by_class: dict[str, int] = {}
    for *_, owner in typed:
        by_class[owner] = by_class.get(owner, 0) + 1
    with capsys.disabled():
        print(f"\npyright resolves {len(typed)} TensorRT calls: "
              + ", ".join(f"{owner} {count}" for owner, count in sorted(by_class.items())))
    assert len(typed) >= MIN_TYPED_TENSORRT_CALLS, sorted(typed)
    # the calls whose misuse would hurt most are among them
    names = {name for _, _, name, _ in typed}
    assert {"execute_async_v3", "set_tensor_address", "set_device_memory", "set_input_shape",
            "create_execution_context", "deserialize_cuda_engine", "build_serialized_network", "set_flag",
            "clear_flag", "add_optimization_profile", "set_timing_cache", "parse_from_file"} <= names, sorted(names)
