"""Test-only packages: a test may skip when one is missing on a developer's machine, never in CI.

CI (environment variable CI=true, as GitHub Actions and most CI services set it) runs the README's test command,
which installs every test dependency (the ``dev`` extra); a package that then fails to import is a broken install,
and hiding it as hundreds of skips would pass a run that checked nothing. Only GPU-side packages (CuPy, TensorRT)
may be absent in CI: their tests skip there, with the reason, through plain ``pytest.importorskip``.
"""

from __future__ import annotations

import importlib
import os

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(module: str, install: str = 'pip install -e ".[export,onnx,dev]"'):
    """Import and return ``module``; if it cannot be imported: skip (module-level allowed) outside CI, fail in CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} cannot be imported ({exc}); install it with: {install}"
        if IN_CI:
            pytest.fail(f"CI installs every test dependency, so this is a failure, not a skip: {message}",
                        pytrace=False)
        pytest.skip(message, allow_module_level=True)


def require_console_script(name: str = "rtsd") -> str:
    """The path of an installed console script; skip outside CI, fail in CI (its install puts it on PATH)."""
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"the {name} console script is not on PATH; install the package with pip install -e ."
        if IN_CI:
            pytest.fail(f"CI installs the package, so this is a failure, not a skip: {message}", pytrace=False)
        pytest.skip(message)
    return path
