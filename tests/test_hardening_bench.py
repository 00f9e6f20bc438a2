"""benchmarks/latency.py with a contender's optional packages missing (issue 16): the contender is skipped with one
line naming what is missing and the install command, instead of its worker dying with an ImportError traceback."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def latency(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("latency_under_test", ROOT / "benchmarks" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while executing it
    spec.loader.exec_module(module)
    return module


def test_contender_with_missing_packages_is_skipped_in_one_line(latency, tiny_checkpoint, tmp_path, monkeypatch,
                                                                 capsys):
    real = importlib.util.find_spec
    missing = {"transformers", "accelerate"}  # diffusers installed without them
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    args = latency._parse(["--quick", "--checkpoint", str(tiny_checkpoint), "--contenders",
                           "onnxruntime-cpu,diffusers"])
    plan = latency._plan(args, tmp_path)
    assert plan.contenders == ["onnxruntime-cpu"]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["skipping diffusers: transformers, accelerate not installed (pip install 'rtsd[dev]')"]


def test_contenders_with_their_packages_are_kept(latency):
    pytest.importorskip("onnxruntime")
    assert latency.runnable_contenders(["onnxruntime-cpu"]) == ["onnxruntime-cpu"]
