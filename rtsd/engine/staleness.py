"""Is a TensorRT plan usable on this machine? Pure functions over manifest records (no TensorRT, no GPU needed).

A ``.plan`` is tied to the exact TensorRT version that built it and to the GPU's compute capability (TensorRT
refuses to deserialize otherwise, or worse, runs slowly on a different GPU model of the same capability). It is also
tied to the ONNX it was built from: a re-exported ONNX makes the plan stale even if it still deserializes. The
exporter records all of these per plan (``Manifest.components[name]["engines"]["tensorrt"]``); the runtime and
``rtsd export --rebuild`` compare them with the machine through ``stale_reasons`` and explain with ``stale_message``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class HostInfo:
    """What a plan must match: the TensorRT version and the GPU (name and compute capability "major.minor")."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def sm_name(compute_capability: str) -> str:
    """"8.9" -> "sm_89", the spelling users know from nvcc and error messages."""
    return "sm_" + str(compute_capability).replace(".", "")


def rebuild_command(engine_dir: str | Path) -> str:
    return f"rtsd export --rebuild {engine_dir} --backend tensorrt"


def stale_reasons(record: Mapping[str, Any] | None, onnx_sha256: str | None, trt_version: str, gpu_name: str,
                  compute_capability: str, *, plan_present: bool = True, precision: str | None = None,
                  profile: Mapping[str, Any] | None = None) -> list[str]:
    """Why the plan described by ``record`` cannot be used here (empty list: it can).

    ``onnx_sha256`` is the hash of the ONNX the plan should have been built from; ``precision`` and ``profile``,
    when given, are what the caller asks for now (a rebuild with other options makes the old plan stale too).
    """
    if record is None:
        return ["no TensorRT engine has been built"]
    reasons = []
    if not plan_present:
        reasons.append(f"{record.get('file', 'the plan file')} is missing")
    built_trt = record.get("tensorrt_version")
    if built_trt != trt_version:
        reasons.append(f"built with TensorRT {built_trt}, this machine has TensorRT {trt_version}")
    built_cc = str(record.get("compute_capability"))
    if built_cc != str(compute_capability):
        reasons.append(f"built for compute capability {sm_name(built_cc)}, this GPU is {sm_name(compute_capability)}")
    elif record.get("gpu") != gpu_name:
        # Same capability deserializes, but tactics were timed on another chip: TensorRT warns and may run slower.
        reasons.append(f"built on {record.get('gpu')}, this GPU is {gpu_name}")
    if onnx_sha256 is not None and record.get("onnx_sha256") != onnx_sha256:
        reasons.append("built from a different ONNX export (sha256 "
                       f"{str(record.get('onnx_sha256'))[:12]} != {onnx_sha256[:12]})")
    if precision is not None and record.get("precision") != precision:
        reasons.append(f"built in {record.get('precision')}, {precision} was requested")
    if profile is not None and _plain(record.get("profile")) != _plain(profile):
        reasons.append("built for other shapes than requested now (optimization profile changed)")
    return reasons


def stale_message(component: str, record: Mapping[str, Any] | None, reasons: list[str], host: HostInfo,
                  engine_dir: str | Path) -> str:
    """One line: what the plan was built for, what this machine has, and the command that fixes it."""
    fix = f"rebuild with `{rebuild_command(engine_dir)}`"
    plan = (record or {}).get("file") or f"{component}.plan"
    if record is None:
        return f"{component}: no TensorRT engine in {engine_dir}: build it with `{rebuild_command(engine_dir)}`"
    built = (f"TensorRT {record.get('tensorrt_version')} on {record.get('gpu')} "
             f"({sm_name(record.get('compute_capability'))})")
    here = f"TensorRT {host.tensorrt_version} on {host.gpu_name} ({sm_name(host.compute_capability)})"
    if built != here:
        return f"{plan} was built for {built}; this machine has {here}: {fix}"
    return f"{plan} cannot be used ({'; '.join(reasons)}): {fix}"


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (profiles come from JSON as lists and from specs as tuples)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
