"""What a benchmark ran on: CPU, cores, load, memory, GPU, library versions, and a measured matmul peak.

    python benchmarks/machine.py [--threads N]     prints the description and the measured peak as JSON

The peak is *measured*, not taken from a datasheet: the best throughput of a large torch matmul on the benchmark's
device, dtype and thread count (CPU: float32 GEMM; GPU: float16 GEMM on tensor cores). That is the fastest any
convolution or matmul-bound network can go on this machine as configured, so "fraction of peak" compares every
contender against something the hardware demonstrably does, not against a marketing number.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

LIBRARIES = ("numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "diffusers", "transformers", "tensorrt",
             "cupy-cuda12x", "safetensors")


def describe() -> dict:
    """CPU model, core counts, load average, memory, GPU (if torch sees one) and the installed library versions."""
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_gib": _memory_gib(),
        "gpu": gpu_name(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES if _version(name)},
    }


def gpu_name() -> str | None:
    """The first CUDA device's name, or None without a usable GPU (asks nvidia-smi: no CUDA context is created)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def measure_peak_flops(device: str = "cpu", threads: int | None = None, seconds: float = 2.0) -> dict:
    """Best FLOP/s of a square torch matmul: float32 on the CPU with ``threads`` threads, float16 on CUDA."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype, n = (torch.float16, 8192) if device == "cuda" else (torch.float32, 2048)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: thread pool start, kernel selection, clocks
        a @ b
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    where = f"{torch.get_num_threads()} threads" if device == "cpu" else torch.cuda.get_device_name()
    return {"flops_per_second": 2 * n**3 / best,
            "how": f"best {n}x{n} {str(dtype).removeprefix('torch.')} matmul over {seconds:g} s, "
                   f"torch {torch.__version__}, {where}"}


class PeakMemory:
    """Peak resident host memory of this process since ``reset()`` (Linux: VmHWM, reset through clear_refs).

    Resetting after the models are loaded lets a benchmark report what *running* costs, separately from the
    transient copies a loader makes; where the reset is not possible the figure is the whole-process peak.
    """

    def __init__(self):
        self.resettable = False

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def peak_mib(self) -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def current_mib(self) -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


def device_memory_used_mib() -> float | None:
    """Memory in use on GPU 0 by every process (nvidia-smi); a benchmark worker reports its change over its run."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return float(out.splitlines()[0]) if out else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for the matmul peak")
    args = parser.parse_args()
    device = "cuda" if gpu_name() else "cpu"
    print(json.dumps({"machine": describe(), "peak": measure_peak_flops(device, args.threads)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
