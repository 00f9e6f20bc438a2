"""`rtsd triton-repo`: the model repository it writes, the Python-backend model driven through a fake of the parts
of `triton_python_backend_utils` it uses, and the repository served by a real `tritonserver` binary.

The real-server test needs the separate Triton environment (the nvidia-pytriton wheel's CPU tritonserver, with
numpy < 2). RTSD_TRITON_PYTHON=DIR/bin/python names one made with `scripts/triton_env.sh DIR`; in CI (CI set) the test
makes its own with that script (about 2 minutes of pip); elsewhere it is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from serving_helpers import SIZE, STEPS, runtime, solo  # noqa: F401 (runtime is a fixture)




def test_repository_layout_and_config(tiny_engine_dir, tmp_path):
    from rtsd.cli import main

    assert main(["triton-repo", str(tiny_engine_dir), str(tmp_path / "repo")]) == 0
    model = tmp_path / "repo" / "rtsd"
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) == ["1", "1/model.py", "config.pbtxt"]
    config = (model / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 2" in config  # the engines' max batch
    assert "dynamic_batching {\n  max_queue_delay_microseconds: 20000\n}" in config
    assert "kind: KIND_CPU" in config  # ONNX-only directory; TensorRT plans would give KIND_GPU
    for name in ("PROMPT", "NEGATIVE_PROMPT", "SEED", "STEPS", "WIDTH", "HEIGHT", "GUIDANCE_SCALE", "SCHEDULER"):
        assert f'name: "{name}"' in config
    assert '{ name: "IMAGES" data_type: TYPE_UINT8 dims: [ -1, -1, -1, 3 ] }' in config
    assert f'string_value: "{Path(tiny_engine_dir).resolve()}"' in config
    assert main(["triton-repo", str(tiny_engine_dir), str(tmp_path / "repo"), "--kind", "KIND_GPU", "--force"]) == 0
    assert "kind: KIND_GPU" in (model / "config.pbtxt").read_text()
    assert main(["triton-repo", str(tiny_engine_dir), str(tmp_path / "repo")]) == 2  # exists, no --force
    assert not list((tmp_path / "repo").glob(".*partial"))


# --- a fake of the triton_python_backend_utils names model.py uses (Tensor, get_input_tensor_by_name,
#     InferenceResponse, TritonError), shaped as the Python backend documents them

class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _TritonError:
    INTERNAL, INVALID_ARG = "INTERNAL", "INVALID_ARG"

    def __init__(self, message, code=INTERNAL):
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


def _fake_pb_utils():
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.TritonError, module.InferenceResponse = _Tensor, _TritonError, _Response
    module.get_input_tensor_by_name = lambda request, name: request.get(name)
    return module


def _request(**values):
    """One request of one row (Triton adds the batch dim): strings as object arrays of bytes, as Triton gives them."""
    tensors = {}
    for name, value in values.items():
        array = np.array([[value.encode() if isinstance(value, str) else value]],
                         dtype=object if isinstance(value, str) else None)
        tensors[name] = _Tensor(name, array)
    return tensors


def test_model_py_through_fake_backend(tiny_engine_dir, tmp_path, runtime, monkeypatch):
    from rtsd.serving.triton.repository import write_repository

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    monkeypatch.delitem(sys.modules, "rtsd.serving.triton.model", raising=False)
    model_dir = write_repository(tiny_engine_dir, tmp_path / "repo")
    namespace: dict = {}
    exec(compile((model_dir / "1" / "model.py").read_text(), "model.py", "exec"), namespace)  # as Triton loads it
    model = namespace["TritonPythonModel"]()
    config = (model_dir / "config.pbtxt").read_text()
    engine_dir = config.split('key: "engine_dir" value: { string_value: "')[1].split('"')[0]
    model.initialize({"model_config": json.dumps({"name": "rtsd", "parameters": {
        "engine_dir": {"string_value": engine_dir}, "default_size": {"string_value": "128"}}}),
        "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    requests = [_request(PROMPT="a boat", SEED=5, STEPS=STEPS, NUM_IMAGES=2),
                _request(PROMPT="a tree", NEGATIVE_PROMPT="snow", SEED=9, STEPS=STEPS, GUIDANCE_SCALE=5.0),
                _request(PROMPT="too big", WIDTH=1024, HEIGHT=1024, STEPS=STEPS),
                _request(PROMPT="a house", SEED=7, STEPS=STEPS, SCHEDULER="euler_a")]
    boat, tree, big, house = model.execute(requests)
    assert boat.error is None and boat.outputs["IMAGES"].shape == (1, 2, SIZE, SIZE, 3)
    assert boat.outputs["IMAGES"].dtype == np.uint8
    assert np.array_equal(boat.outputs["IMAGES"][0, 0], solo(runtime, "a boat", 5))
    assert np.array_equal(boat.outputs["IMAGES"][0, 1], solo(runtime, "a boat", 6))
    assert np.array_equal(tree.outputs["IMAGES"][0, 0], solo(runtime, "a tree", 9, negative_prompt="snow",
                                                              guidance_scale=5.0))
    assert np.array_equal(house.outputs["IMAGES"][0, 0], solo(runtime, "a house", 7, scheduler="euler_a"))
    assert big.error.code == "INVALID_ARG" and "outside the exported range" in big.error.message
    boat_info = json.loads(boat.outputs["INFO"].reshape(-1)[0])
    assert boat_info["seeds"] == [5, 6] and boat_info["batches"][0]["batch_images"] == 2  # max batch 2: full calls
    model.finalize()


@pytest.fixture(scope="module")
def triton_python(tmp_path_factory) -> str:
    """The separate Triton environment's interpreter: given, made here in CI, or the test is skipped."""
    if os.environ.get("RTSD_TRITON_PYTHON"):
        return os.environ["RTSD_TRITON_PYTHON"]
    if not os.environ.get("CI"):
        pytest.skip("the real tritonserver check needs its own environment: scripts/triton_env.sh DIR, then "
                    "RTSD_TRITON_PYTHON=DIR/bin/python (CI makes it by itself)")
    venv = tmp_path_factory.mktemp("triton") / "venv"
    script = Path(__file__).resolve().parent.parent / "scripts" / "triton_env.sh"
    made = subprocess.run(["bash", str(script), str(venv)], capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, "scripts/triton_env.sh failed: " + (made.stdout + made.stderr)[-2000:]
    return str(venv / "bin" / "python")


def test_real_tritonserver(tiny_engine_dir, tmp_path, runtime, triton_python):
    from rtsd.serving.triton.repository import write_repository

    write_repository(tiny_engine_dir, tmp_path / "repo", max_queue_delay_us=500_000)
    requests = [{"PROMPT": f"a mountain {i}", "SEED": 40 + i, "STEPS": STEPS, "WIDTH": SIZE, "HEIGHT": SIZE}
                for i in range(4)]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    out = tmp_path / "out"
    script = Path(__file__).with_name("triton_check.py")
    run = subprocess.run([triton_python, str(script), str(tmp_path / "repo"),
                          str(tmp_path / "requests.json"), str(out)], capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for i, spec in enumerate(requests):
        images = np.load(out / f"images_{i}.npy")
        assert images.shape == (1, SIZE, SIZE, 3) and images.dtype == np.uint8
        assert np.array_equal(images[0], solo(runtime, spec["PROMPT"], spec["SEED"]))
    metrics = dict(line.rsplit(" ", 1) for line in (out / "metrics.txt").read_text().splitlines()
                   if line.startswith("nv_inference_") and 'model="rtsd"' in line)
    requests_done = float(metrics['nv_inference_request_success{model="rtsd",version="1"}'])
    executions = float(metrics['nv_inference_exec_count{model="rtsd",version="1"}'])
    assert requests_done == 4 and executions < 4, f"Triton batched nothing: {executions:.0f} executions"
    assert "outside the exported range" in (out / "bad_request.txt").read_text()
