"""Run by tests/test_serving_triton.py with the Python of the Triton environment (scripts/triton_env.sh), not with
pytest: serves a model repository with the real `tritonserver` binary of the nvidia-pytriton wheel (CPU), sends the
requests described in a JSON file with tritonclient (concurrently, so the dynamic batcher has company), and writes the
images and Triton's metrics back for the test to compare with direct `Runtime.generate` calls.

    python tests/triton_check.py REPOSITORY REQUESTS.json OUT_DIR
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_backend(work: Path) -> Path:
    """The wheel's python backend plus the stub built for this Python, in one backend directory Triton can load."""
    import pytriton

    root = Path(pytriton.__file__).parent / "tritonserver"
    backends = work / "backends"
    shutil.copytree(root / "backends", backends)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(root / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    return root / "bin" / "tritonserver", backends


def main(repository, requests_file, out_dir):
    import tritonclient.http as http

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    binary, backends = prepare_backend(out / "work")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    import pytriton

    # The stub links the wheel's bundled libraries (libcudart, ...), which sit beside the package.
    bundled = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(filter(None, [str(bundled), os.environ.get("LD_LIBRARY_PATH")])))
    # The stub runs this interpreter's site-packages (rtsd, onnxruntime, numpy < 2).
    # An editable install is a .pth import hook, which PYTHONPATH entries do not run: name rtsd's root too.
    import rtsd

    env["PYTHONPATH"] = ":".join([str(Path(rtsd.__file__).parent.parent)] + [p for p in sys.path if p])
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the stub takes its Python from PATH (as pytriton)
    log = open(out / "tritonserver.log", "w")
    server = subprocess.Popen([str(binary), f"--model-repository={repository}", f"--backend-directory={backends}",
                               f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
                               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--allow-sagemaker=false",
                               "--log-verbose=0"], stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{http_port}", concurrency=8, network_timeout=300)
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None:
                raise SystemExit(f"tritonserver exited with {server.returncode}; see {out / 'tritonserver.log'}")
            try:
                if client.is_model_ready("rtsd"):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise SystemExit("tritonserver did not load the model in 240 s")
            time.sleep(1)
        requests = json.loads(Path(requests_file).read_text())

        def infer(spec):
            inputs = []
            for name, value in spec.items():
                array = np.array([[value.encode() if isinstance(value, str) else value]],
                                 dtype={"PROMPT": object, "NEGATIVE_PROMPT": object, "SCHEDULER": object,
                                        "SEED": np.int64, "GUIDANCE_SCALE": np.float32}.get(name, np.int32))
                tensor = http.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else
                                         {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
                                          np.dtype(np.float32): "FP32"}[array.dtype])
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            return client.async_infer("rtsd", inputs)  # tritonclient.http is gevent-based: no threads of our own

        def outputs(pending):
            result = pending.get_result()
            return result.as_numpy("IMAGES")[0], json.loads(result.as_numpy("INFO").reshape(-1)[0])

        results = [outputs(pending) for pending in [infer(spec) for spec in requests]]  # all sent, then awaited
        for i, (images, info) in enumerate(results):
            np.save(out / f"images_{i}.npy", images)
            (out / f"info_{i}.json").write_text(json.dumps(info))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
            (out / "metrics.txt").write_text(response.read().decode())
        bad = None
        try:  # a request the engines refuse is an error for that request only
            outputs(infer({"PROMPT": "x", "WIDTH": 1024, "HEIGHT": 1024, "STEPS": 1}))
        except Exception as exc:  # noqa: BLE001
            bad = str(exc)
        (out / "bad_request.txt").write_text(bad or "")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(out / "work", ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
