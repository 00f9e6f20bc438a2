"""Helpers for the serving tests: the shared runtime fixture and solo reference, free ports, base64 images, and
checking that no Ray process is left behind."""

from __future__ import annotations

import base64
import io
import socket
import time

import numpy as np
import pytest

SIZE, STEPS = 128, 3  # what every serving test requests (the tiny engine dir covers 128..256)


@pytest.fixture(scope="module")
def runtime(tiny_engine_dir):
    """One Runtime on the tiny engine dir per test module: the direct-generate reference of every serving test."""
    from rtsd.runtime import Runtime

    rt = Runtime(tiny_engine_dir)
    yield rt
    rt.close()


def solo(runtime, prompt, seed, **kwargs) -> np.ndarray:
    """The reference: the same request generated alone, directly, one image, with this image's seed."""
    options = dict(steps=STEPS, height=SIZE, width=SIZE, guidance_scale=7.5, scheduler="dpmpp_2m") | kwargs
    return np.asarray(runtime.generate(prompt, seed=seed, **options).images[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64_to_array(data: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def array_to_b64(array: np.ndarray, prefix: str = "") -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return prefix + base64.b64encode(buffer.getvalue()).decode()


def ray_processes(marker: str) -> list:
    """Live processes whose command line mentions ``marker`` (the test's own RAY_TMPDIR): raylet, gcs_server."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_gone(processes: list, timeout: float = 30.0) -> list:
    """-> the processes still alive after ``timeout`` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    alive = list(processes)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.5)
    return alive


def kill_all(processes: list) -> None:
    """Last resort after a failed test: end exactly these processes (by pid, never by name)."""
    import psutil

    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
