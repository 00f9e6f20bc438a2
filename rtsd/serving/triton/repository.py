"""``rtsd triton-repo ENGINE_DIR OUT``: a Triton Inference Server model repository with one Python-backend model that
runs the whole rtsd loop in-process (the on-device loop and CUDA graphs stay; a per-step round trip between separate
Triton models would lose them).

    OUT/rtsd/config.pbtxt   python backend, dynamic batching, KIND_GPU instances (KIND_CPU for ONNX-only dirs),
                            per-request PROMPT / NEGATIVE_PROMPT / SEED / STEPS / WIDTH / HEIGHT / GUIDANCE_SCALE /
                            SCHEDULER / NUM_IMAGES inputs, IMAGES (UINT8, [num_images, H, W, 3]) and INFO (JSON) out
    OUT/rtsd/1/model.py     imports rtsd.serving.triton.model: rtsd must be installed in Triton's Python

The engine directory's absolute path is a model parameter; the repository holds no engine files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rtsd.errors import EngineDirError
from rtsd.export.manifest import Manifest
from rtsd.export.specs import COMPONENTS

# (name, Triton type, optional): every input is one value per request row (dims [1] after the batch dim).
INPUTS = (
    ("PROMPT", "TYPE_STRING", False),
    ("NEGATIVE_PROMPT", "TYPE_STRING", True),
    ("SEED", "TYPE_INT64", True),
    ("STEPS", "TYPE_INT32", True),
    ("WIDTH", "TYPE_INT32", True),
    ("HEIGHT", "TYPE_INT32", True),
    ("GUIDANCE_SCALE", "TYPE_FP32", True),
    ("SCHEDULER", "TYPE_STRING", True),
    ("NUM_IMAGES", "TYPE_INT32", True),
)
MODEL_PY = '"""rtsd as a Triton Python-backend model; written by `rtsd triton-repo`."""\n\n' \
           'from rtsd.serving.triton.model import TritonPythonModel  # noqa: F401\n'


def write_repository(engine_dir, output, *, name: str = "rtsd", instances: int = 1, kind: str | None = None,
                     max_queue_delay_us: int = 20000, force: bool = False) -> Path:
    """Write OUT/<name>/{config.pbtxt, 1/model.py}; -> the model directory. Nothing is left half-written."""
    engine_dir = Path(engine_dir).resolve()
    manifest = Manifest.read(engine_dir)
    if kind is None:
        kind = "KIND_GPU" if all(manifest.engine_record(c, "tensorrt") for c in COMPONENTS) else "KIND_CPU"
    if instances < 1:
        raise ValueError(f"--instances must be at least 1, got {instances}")
    model_dir = Path(output) / name
    if model_dir.exists() and not force:
        raise EngineDirError(f"{model_dir} already exists; pass --force to replace it")
    staging = Path(output) / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "1").mkdir(parents=True)
        (staging / "config.pbtxt").write_text(config_pbtxt(name, engine_dir, manifest.shape_range.max_batch,
                                                           manifest.shape_range.opt_size, kind, instances,
                                                           max_queue_delay_us))
        (staging / "1" / "model.py").write_text(MODEL_PY)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        staging.rename(model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def config_pbtxt(name: str, engine_dir: Path, max_batch: int, default_size: int, kind: str, instances: int,
                 max_queue_delay_us: int) -> str:
    inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: {t} dims: [ 1 ]{" optional: true" if optional else ""} }}'
        for n, t, optional in INPUTS)
    return f"""# Written by `rtsd triton-repo` for {engine_dir}
name: "{name}"
backend: "python"
# Request rows per execute(): the engines' max batch (each row may ask for NUM_IMAGES images).
max_batch_size: {max_batch}
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
input [
{inputs}
]
output [
  {{ name: "IMAGES" data_type: TYPE_UINT8 dims: [ -1, -1, -1, 3 ] }},
  {{ name: "INFO" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [
  {{ count: {instances} kind: {kind} }}
]
parameters: {{ key: "engine_dir" value: {{ string_value: "{engine_dir}" }} }}
parameters: {{ key: "default_size" value: {{ string_value: "{default_size}" }} }}
"""
