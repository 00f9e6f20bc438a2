"""A thin CUDA layer over CuPy: the device, grow-only buffers, CUDA-graph caching, event timers.

Nothing here imports CuPy at module level: ``import rtsd.engine.cuda`` works on a machine without a GPU, and the
buffer and graph-cache logic is written against an array namespace / stream object so that it is testable on the
CPU with NumPy and a stand-in stream. CuPy is the only CUDA binding the runtime needs (memory, streams, events,
graph capture); cuda-python is not required.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any, Callable, Hashable, Iterator

import numpy as np

from rtsd.errors import MissingDependencyError, RtsdError

INSTALL_HINT = "pip install 'rtsd[tensorrt]' (TensorRT 10 and CuPy; needs an NVIDIA GPU and its driver)"


class GpuDependencyError(MissingDependencyError):
    """A GPU-side package (tensorrt, cupy) is missing; one line with the install command."""

    def __init__(self, package: str, purpose: str, found: str | None = None, stand_in: str | None = None):
        if found is None:
            detail = f" ({stand_in})" if stand_in else ""
            message = f"{purpose} needs '{package}', which is not installed{detail}: {INSTALL_HINT}"
        else:
            message = f"{purpose} needs {package}, this machine has {found}: pip install '{package}'"
        RtsdError.__init__(self, message)
        self.package, self.extra = package, "tensorrt"


class NoCudaDeviceError(MissingDependencyError):
    """The packages are there but no CUDA device is usable (no GPU, no driver, or a driver too old)."""

    def __init__(self, purpose: str, detail: str):
        RtsdError.__init__(self, f"{purpose} needs an NVIDIA GPU with a working CUDA driver and none is usable here "
                                 f"({detail}); use --backend onnxruntime on this machine")
        self.package, self.extra = "cuda", "tensorrt"


def import_cupy(purpose: str):
    try:
        import cupy  # pyright: ignore[reportMissingImports]  (not installed where CI type-checks; imported lazily)
    except ImportError:
        raise GpuDependencyError("cupy-cuda12x", purpose) from None
    return cupy


def cuda_device(purpose: str, device: int = 0) -> tuple[Any, str, str]:
    """(cupy, GPU name, compute capability "major.minor") of ``device``; a clear error when there is none."""
    cp = import_cupy(purpose)
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver; its text names the cause
        raise NoCudaDeviceError(purpose, f"{type(exc).__name__}: {exc}") from None
    if count <= device:
        raise NoCudaDeviceError(purpose, f"{count} CUDA device(s) found, device {device} requested")
    props = cp.cuda.runtime.getDeviceProperties(device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return cp, name, f"{props['major']}.{props['minor']}"


def data_pointer(array) -> int:
    """Address of an array's first element: device pointer for CuPy, host pointer for NumPy."""
    interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
    return int(interface["data"][0])


class GrowOnlyBuffers:
    """Named buffers that are reallocated only when a larger size is requested, then handed out as views.

    ``allocations`` counts real allocations (a generation loop must not add any after its first step) and
    ``generation`` changes whenever any buffer moved, which is what invalidates tensor addresses and CUDA graphs.
    ``xp`` is the array module (cupy on the device; numpy works too, which is how the policy is tested on a CPU).
    """

    ALIGN = 256  # TensorRT requires 256-byte aligned I/O addresses; CuPy's pool hands out 512-byte aligned blocks

    def __init__(self, xp):
        self.xp = xp
        self._raw: dict[str, Any] = {}
        self.allocations = 0
        self.generation = 0

    def reserve(self, name: str, nbytes: int) -> bool:
        """Make ``name`` hold at least ``nbytes``; True if it had to be (re)allocated."""
        nbytes = max(self.ALIGN, -(-int(nbytes) // self.ALIGN) * self.ALIGN)
        current = self._raw.get(name)
        if current is not None and current.nbytes >= nbytes:
            return False
        self._raw[name] = None  # release the old block first so the pool can reuse it
        self._raw[name] = self.xp.empty(nbytes, dtype=self.xp.uint8)
        self.allocations += 1
        self.generation += 1
        return True

    def view(self, name: str, shape: tuple[int, ...], dtype) -> Any:
        """A C-contiguous array of ``shape``/``dtype`` over the start of buffer ``name`` (grown if needed)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        self.reserve(name, nbytes)
        return self._raw[name][:nbytes].view(dtype).reshape(shape)

    @property
    def nbytes(self) -> int:
        return sum(raw.nbytes for raw in self._raw.values())

    def release(self) -> None:
        self._raw.clear()
        self.generation += 1


# cudaStreamCaptureModeThreadLocal (driver_types.h: Global 0, ThreadLocal 1, Relaxed 2; CuPy exposes the same value
# as cupy.cuda.runtime.streamCaptureModeThreadLocal). A literal keeps this module importable without CuPy.
THREAD_LOCAL_CAPTURE = 1


def cuda_error_clearer() -> Callable[[], None]:
    """A function that reads and resets the CUDA runtime's pending error (cudaGetLastError), or a no-op where no
    shared CUDA runtime library can be found. CuPy does not wrap cudaGetLastError, so it is called through ctypes on
    the shared libcudart (dlopen of an already loaded soname returns that library). It clears that runtime's error
    state only; a library linking the CUDA runtime statically keeps its own. Not yet run on a GPU."""
    import ctypes

    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so", "cudart64_12.dll"):
        try:
            get_last_error = ctypes.CDLL(name).cudaGetLastError
        except (OSError, AttributeError):
            continue
        get_last_error.restype = ctypes.c_int

        def clear() -> None:
            get_last_error()
        return clear
    return lambda: None


class GraphCache:
    """CUDA graphs of one enqueue function, one per key (the input shapes), captured after a warm-up call.

    The first ``warmup_calls`` calls at a key run plainly (TensorRT must run once at new shapes before capture so
    that deferred shape-dependent updates are flushed); the next call captures the enqueue into a graph and launches
    it; later calls only launch. Because graphs are keyed by shape, dynamic-shape engines get one graph per shape in
    use. A key whose capture fails runs plainly from then on (``failures`` says why, until ``clear``).

    Capture is thread-local, as trtexec captures: only this thread is barred from unsafe CUDA calls while it captures
    (CuPy's default, relaxed, would let another call of this thread such as a cudaMalloc slip by unnoticed; global
    would fail captures because of unrelated threads). After a failed capture ``clear_error`` is called before the
    plain run, so a CUDA error left pending by the invalidated capture is not reported by the next, unrelated call.
    ``stream`` needs ``begin_capture(mode=)``, ``end_capture() -> graph`` and ``graph.launch(stream=)``: CuPy's
    Stream and Graph.
    """

    def __init__(self, stream: Any, warmup_calls: int = 1, clear_error: Callable[[], None] | None = None):
        self.stream = stream
        self.warmup_calls = warmup_calls
        self.clear_error = clear_error or (lambda: None)
        self._graphs: dict[Hashable, Any] = {}
        self._calls: dict[Hashable, int] = defaultdict(int)
        self.failures: dict[Hashable, str] = {}
        self.captures = 0
        self.replays = 0

    def run(self, key: Hashable, enqueue: Callable[[], None]) -> str:
        """Run ``enqueue``'s work for ``key`` on the stream; returns "plain", "captured" or "replayed"."""
        graph = self._graphs.get(key)
        if graph is not None:
            graph.launch(stream=self.stream)
            self.replays += 1
            return "replayed"
        self._calls[key] += 1
        if key in self.failures or self._calls[key] <= self.warmup_calls:
            enqueue()
            return "plain"
        try:
            self.stream.begin_capture(mode=THREAD_LOCAL_CAPTURE)
            try:
                enqueue()
            finally:
                graph = self.stream.end_capture()  # always end, or the stream stays unusable
        except Exception as exc:  # not capturable (e.g. an engine with data-dependent shapes): run plainly
            self.failures[key] = f"{type(exc).__name__}: {exc}"
            self.clear_error()
            enqueue()
            return "plain"
        self._graphs[key] = graph
        self.captures += 1
        graph.launch(stream=self.stream)
        return "captured"

    def drop(self, key: Hashable) -> None:
        """Forget the graph of one key (its execution context is going away)."""
        self._graphs.pop(key, None)
        self._calls.pop(key, None)
        self.failures.pop(key, None)

    def clear(self) -> None:
        """Forget every graph: they bake in buffer addresses, so any buffer reallocation invalidates them. Failed
        captures are forgotten too: a capture that failed at the old addresses is tried again at the new ones."""
        self._graphs.clear()
        self._calls.clear()
        self.failures.clear()

    def __len__(self) -> int:
        return len(self._graphs)


class EventTimer:
    """Per-stage device time from CUDA events recorded on one stream; read after the work is done."""

    def __init__(self, cupy, stream):
        self._cp, self._stream = cupy, stream
        self._spans: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def section(self, label: str) -> Iterator[None]:
        start, end = self._cp.cuda.Event(), self._cp.cuda.Event()
        start.record(self._stream)
        yield
        end.record(self._stream)
        self._spans.append((label, start, end))

    def milliseconds(self) -> dict[str, float]:
        """Total device milliseconds per label (synchronizes on the last event)."""
        totals: dict[str, float] = defaultdict(float)
        for label, start, end in self._spans:
            end.synchronize()
            totals[label] += self._cp.cuda.get_elapsed_time(start, end)
        return dict(totals)


def to_device(cupy, array, stream=None):
    """Host -> device copy on ``stream`` (device arrays pass through unchanged)."""
    if hasattr(array, "__cuda_array_interface__"):
        return array
    with stream or contextlib.nullcontext():
        return cupy.asarray(np.ascontiguousarray(array))


def to_host(array, stream=None) -> np.ndarray:
    """Device -> host copy (waits for ``stream``); NumPy arrays pass through unchanged."""
    if isinstance(array, np.ndarray):
        return array
    return array.get(stream=stream)
