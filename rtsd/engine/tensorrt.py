"""The TensorRT backend: fp16 plans run through TensorRT 10's enqueueV3 API on one CUDA stream, CuPy arrays in/out.

Memory: every execution context is created without its own device memory (USER_MANAGED) and points at one shared
activation block sized to the largest ``device_memory_size_v2`` of the loaded engines; they run one after another
on one stream, so four engines cost little more than the UNet alone. I/O tensors live in grow-only buffers per
engine, allocated for the largest shape seen and reused (a generation loop allocates nothing after its first step).

CUDA graphs: the UNet call (dozens of launches per step) is captured into a CUDA graph per input-shape key after one
warm-up call at that shape and replayed afterwards. Each captured shape gets its own execution context (cheap: no
device memory of its own), because a graph bakes in the context's shape-dependent state; this is what makes graphs
work with dynamic-shape engines. At most ``MAX_GRAPH_SHAPES`` shapes are kept.

Checks before anything runs: plans built for another TensorRT/GPU/ONNX are refused at load (with the rebuild
command), feeds are validated against the IOSpec, and a request outside the engine's optimization profile fails
naming what the engines were built for and the export flags that would cover it. Non-finite VAE output switches to
the fp32 fallback plan when the export built one, else raises NonFiniteOutputError.

TensorRT and CuPy are imported when a TensorRTBackend is created; the pure helpers here run anywhere.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from rtsd.engine.cuda import (EventTimer, GpuDependencyError, GraphCache, GrowOnlyBuffers, cuda_device,
                              cuda_error_clearer, data_pointer, to_host)
from rtsd.engine.staleness import HostInfo, rebuild_command, stale_message, stale_reasons
from rtsd.errors import EngineDirError, NonFiniteOutputError, RtsdError
from rtsd.export.manifest import Manifest
from rtsd.export.specs import IOSpec

if TYPE_CHECKING:  # the 10.x type stubs (tensorrt-stubs): pyright checks every TensorRT call against them
    import tensorrt

MIN_TENSORRT = (10, 1)  # device_memory_size_v2 and set_device_memory(memory, size) arrived in 10.1
# TensorRT 11 removed weak typing (BuilderFlag.FP16, per-layer precision) that the builder's fp16 policy relies on.
BELOW_TENSORRT = (11, 0)
TENSORRT_REQUIREMENT = "tensorrt>=10.1,<11"
MAX_GRAPH_SHAPES = 8
SIZE_STEP = 64  # export flags are suggested in multiples of this (ShapeRange's default size_multiple)


def import_tensorrt(purpose: str) -> Any:
    """The tensorrt module, checked to be TensorRT >= 10.1; one clear error otherwise.

    A ``tensorrt`` that imports but is not TensorRT counts as missing: with only the type stubs installed
    (``tensorrt-stubs``, used by the type check), ``import tensorrt`` finds a namespace package with no
    ``__version__``, no ``Builder`` and no ``Runtime``.
    """
    try:
        import tensorrt
    except ImportError:
        raise GpuDependencyError("tensorrt", purpose) from None
    version_text = getattr(tensorrt, "__version__", None)
    if not isinstance(version_text, str) or not all(callable(getattr(tensorrt, name, None))
                                                    for name in ("Builder", "Runtime", "Logger")):
        where = ", ".join(getattr(tensorrt, "__path__", None) or [getattr(tensorrt, "__file__", None) or "a module"])
        raise GpuDependencyError("tensorrt", purpose, stand_in=f"'import tensorrt' found {where}, which is not "
                                                               f"TensorRT (only its type stubs?)")
    version = tuple(int(p) for p in version_text.split(".")[:2] if p.isdigit())
    if not MIN_TENSORRT <= version < BELOW_TENSORRT:
        raise GpuDependencyError(TENSORRT_REQUIREMENT, purpose, found=f"TensorRT {version_text}")
    return tensorrt


# ---------------------------------------------------------------- profile coverage (pure, CPU-testable)

def request_size(spec: IOSpec, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int | None, int | None]:
    """(rows, height px, width px) of a call from its input shapes; height/width None for the text encoder."""
    found = {}
    for tensor in spec.inputs:
        for axis, dim in enumerate(tensor.shape):
            if isinstance(dim, str):
                scale = spec.downsample if dim.startswith("latent_") else 1
                found.setdefault(dim.replace("latent_", ""), shapes[tensor.name][axis] * scale)
    return found["batch"], found.get("height"), found.get("width")


def profile_ranges(spec: IOSpec, profile: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, tuple[int, int]]:
    """The profile in user terms: {"rows": (lo, hi), "height": (lo, hi), "width": (lo, hi)} (pixels)."""
    low = request_size(spec, {name: tuple(c["min"]) for name, c in profile.items()})
    high = request_size(spec, {name: tuple(c["max"]) for name, c in profile.items()})
    return {key: (lo, hi) for key, lo, hi in zip(("rows", "height", "width"), low, high)
            if lo is not None and hi is not None}


def outside_profile(shapes: Mapping[str, tuple[int, ...]],
                    profile: Mapping[str, Mapping[str, tuple[int, ...]]]) -> list[str]:
    """Each input axis outside the profile's min..max, described; empty when the call fits."""
    problems = []
    for name, corners in profile.items():
        for axis, (value, lo, hi) in enumerate(zip(shapes[name], corners["min"], corners["max"])):
            if not lo <= value <= hi:
                problems.append(f"{name} axis {axis} is {value}, profile {lo}..{hi}")
    return problems


def covering_flags(spec: IOSpec, rows: int, height: int | None, width: int | None,
                   ranges: Mapping[str, tuple[int, int]], static: bool) -> list[str]:
    """Export flags whose engines would accept this call."""
    flags = ["without --static"] if static else []
    if height is not None and width is not None:
        lo, hi = min(height, width), max(height, width)
        if hi > min(ranges["height"][1], ranges["width"][1]):
            flags.append(f"--max-size {math.ceil(hi / SIZE_STEP) * SIZE_STEP}")
        if lo < max(ranges["height"][0], ranges["width"][0]):
            flags.append(f"--min-size {max(SIZE_STEP, lo // SIZE_STEP * SIZE_STEP)}")
    if rows > ranges["rows"][1]:
        flags.append(f"--max-batch {math.ceil(rows / spec.batch_factor)}")
    return flags


def check_profile(spec: IOSpec, shapes: Mapping[str, tuple[int, ...]],
                  profile: Mapping[str, Mapping[str, tuple[int, ...]]], *, static: bool = False) -> None:
    """Raise ValueError (before any engine runs) if ``shapes`` is outside the engine's optimization profile."""
    if not outside_profile(shapes, profile):
        return
    rows, height, width = request_size(spec, shapes)
    ranges = profile_ranges(spec, profile)
    asked = f"{rows} row{'s' if rows != 1 else ''}" + (f" at {height}x{width} px" if height is not None else "")
    per_image = " (images x2 with classifier-free guidance)" if spec.batch_factor > 1 else ""
    built = f"{ranges['rows'][0]}..{ranges['rows'][1]} rows{per_image}"
    if "height" in ranges:
        (h0, h1), (w0, w1) = ranges["height"], ranges["width"]
        built += f" at {h0}..{h1} x {w0}..{w1} px" if (h0, h1) != (w0, w1) else f" at {h0}..{h1} px"
    if static:
        built += " (static engine: that one shape only)"
    flags = covering_flags(spec, rows, height, width, ranges, static)
    command = " ".join(["rtsd export --checkpoint CKPT --output DIR --backend tensorrt",
                        *(f for f in flags if f.startswith("--"))])
    fix = f"re-export with `{command}`" + (" (without --static)" if static else "")
    raise ValueError(f"{spec.name}: {asked} is outside the TensorRT engine, built for {built}: {fix}")


# ---------------------------------------------------------------- device side

def dims_tuple(dims: tensorrt.Dims) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple of ints (Dims is a sequence at run time; its stub lacks __iter__)."""
    return tuple(dims)



class ActivationMemoryError(RtsdError, RuntimeError):
    """The shared activation block could not grow; the engines already loaded keep the old block and still run."""


class SharedActivationMemory:
    """One device block used as activation memory by every execution context (they never run concurrently).

    Growing is all-or-nothing: the new block is allocated while the old one is still held, then every context is
    re-pointed and the generation bumped (captured graphs baked in the old address), and only then is the old block
    released. If the allocation fails, nothing changed: the contexts, ``size`` and captured graphs still refer to
    the old block, which is still alive, and the caller gets one line saying so.
    """

    def __init__(self, cupy: Any):
        self._cp = cupy
        self._block: Any = None
        self.size = 0
        self.generation = 0  # bumps when the block moves: captured graphs that baked in its address are invalid
        self._contexts: list[tensorrt.IExecutionContext] = []

    def reserve(self, nbytes: int) -> None:
        # TensorRT's set_device_memory: a 256-byte aligned address (CuPy's blocks are), at least device_memory_size_v2
        nbytes = max(int(nbytes), 256)
        if nbytes <= self.size:
            return
        self._cp.cuda.Device().synchronize()  # nothing may still run in the old block
        try:
            block = self._cp.cuda.alloc(nbytes)
        except Exception as exc:  # cupy.cuda.memory.OutOfMemoryError (or a driver error): keep the old block
            have = f"keeping the current {self.size} bytes" if self._block is not None else "none allocated yet"
            raise ActivationMemoryError(
                f"TensorRT activation memory could not grow to {nbytes} bytes ({type(exc).__name__}; {have}): "
                f"free GPU memory, or re-export with smaller --max-size/--max-batch") from None
        for context in self._contexts:
            context.set_device_memory(block.ptr, nbytes)
        old, self._block, self.size = self._block, block, nbytes
        self.generation += 1
        del old  # released only now that no context points at it

    def attach(self, context: tensorrt.IExecutionContext, required: int) -> None:
        self.reserve(required)
        context.set_device_memory(self._block.ptr, self.size)
        self._contexts.append(context)

    def detach(self, context: tensorrt.IExecutionContext) -> None:
        self._contexts = [c for c in self._contexts if c is not context]


@dataclass
class _Slot:
    """An execution context and the state it was last configured with."""

    context: tensorrt.IExecutionContext
    shapes: tuple | None = None
    stamp: tuple | None = None  # (buffer generation, activation generation) its tensor addresses were set for


class TensorRTEngine:
    """One deserialized plan behind the Engine protocol; created by TensorRTBackend.load."""

    def __init__(self, backend: "TensorRTBackend", name: str, spec: IOSpec, engine: tensorrt.ICudaEngine, *,
                 precision: str, static: bool, cuda_graph: bool, check_finite: bool, fallback_plan: Path | None,
                 engine_dir: Path):
        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = backend.trt  # TensorRT, or the test stand-in
        self.name, self.spec, self.xp, self.precision, self.static = name, spec, backend.xp, precision, static
        self.return_views = False  # True: outputs are views of the reused buffers, valid until the next call
        self.check_finite = check_finite
        self.last_run = None  # "plain" | "captured" | "replayed": how the last call ran
        self._backend, self._engine, self._engine_dir = backend, engine, engine_dir
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self._inputs) != sorted(t.name for t in spec.inputs) or \
                sorted(self._outputs) != sorted(t.name for t in spec.outputs):
            raise EngineDirError(f"{name}.plan has inputs {self._inputs} and outputs {self._outputs}, the manifest "
                                 f"declares {[t.name for t in spec.inputs]} -> {[t.name for t in spec.outputs]}: "
                                 f"rebuild with `{rebuild_command(engine_dir)}`")
        try:  # trt.nptype raises TypeError for bf16/fp8/fp4 I/O (no NumPy equivalent); rtsd exports fp32/fp16 I/O
            self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        except TypeError:
            kinds = sorted({str(engine.get_tensor_dtype(n)) for n in names})
            raise EngineDirError(f"{name}.plan has I/O tensors of type {kinds}, which NumPy/CuPy cannot hold: "
                                 f"rebuild with `{rebuild_command(engine_dir)}`") from None
        self.profile: dict[str, dict[str, tuple[int, ...]]] = {
            n: {corner: dims_tuple(dims)
                for corner, dims in zip(("min", "opt", "max"), engine.get_tensor_profile_shape(n, 0))}
            for n in self._inputs}
        self._buffers = GrowOnlyBuffers(self.xp)
        self._slots: OrderedDict[Any, _Slot] = OrderedDict()
        self._graphs = GraphCache(backend.stream, clear_error=backend.clear_cuda_error) if cuda_graph else None
        self._graph_stamp = None
        self._fallback_plan, self._fallback = fallback_plan, None

    @property
    def allocations(self) -> int:
        """Device buffer allocations so far (constant across the steps of a generation)."""
        return self._buffers.allocations

    @property
    def activation_bytes(self) -> int:
        """Activation memory this engine needs (it uses the backend's shared block)."""
        return int(self._engine.device_memory_size_v2)

    @property
    def graphs(self) -> GraphCache | None:
        return self._graphs

    def allocate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if name not in self._dtypes:
                raise ValueError(f"{self.name}: no tensor named {name!r}; tensors are {sorted(self._dtypes)}")
            self._buffers.reserve(name, math.prod(shape) * self._dtypes[name].itemsize)

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self.spec.validate(feeds)
        shapes = {t.name: tuple(int(d) for d in feeds[t.name].shape) for t in self.spec.inputs}
        check_profile(self.spec, shapes, self.profile, static=self.static)
        if self._fallback is not None:
            return self._fallback.infer(feeds)
        outputs = self._run(feeds, shapes)
        if self.check_finite and not self._all_finite(outputs):
            if self.precision == "fp32":
                raise NonFiniteOutputError(f"{self.name} produced non-finite values even in fp32: the weights or "
                                           f"the inputs hold inf/NaN; check the checkpoint with `rtsd parity`")
            if self._fallback_plan is None:
                raise NonFiniteOutputError(
                    f"{self.name} ({self.precision}) produced non-finite values, an fp16 overflow; build the VAE in "
                    f"fp32: `rtsd export --checkpoint CKPT --output DIR --backend tensorrt --fp32-vae`")
            warnings.warn(f"{self.name}: the {self.precision} plan produced non-finite values; switching to "
                          f"{self._fallback_plan.name} (fp32) for the rest of this session", RuntimeWarning)
            self._fallback = self._backend.load_plan(self.name, self.spec, self._fallback_plan, self._engine_dir,
                                                     precision="fp32", static=self.static, check_finite=True)
            return self._fallback.infer(feeds)
        return outputs

    def refit(self, weights: Mapping[str, np.ndarray]) -> None:
        """New values for named weights (LoRA switch, engine/refit.py); captured graphs are dropped afterwards."""
        from rtsd.engine.refit import refit_engine

        self.synchronize()  # no queued call may run while the weights change
        refit_engine(self._backend.trt, self._engine, self._backend._logger, weights)
        if self._graphs is not None:
            self._graphs.clear()

    def to_host(self, array) -> np.ndarray:
        """Device -> host copy, ordered after this engine's work on the shared stream."""
        return to_host(array, self._backend.stream)

    def synchronize(self) -> None:
        self._backend.stream.synchronize()

    def close(self) -> None:
        self._backend.stream.synchronize()  # nothing queued may still use the contexts or buffers released here
        for slot in self._slots.values():
            self._backend.activation.detach(slot.context)
        self._slots.clear()
        if self._graphs is not None:
            self._graphs.clear()
        self._buffers.release()
        if self._fallback is not None:
            self._fallback.close()

    # -- internals

    def _run(self, feeds: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        cp, stream = self.xp, self._backend.stream
        caller = cp.cuda.get_current_stream()
        if caller.ptr != stream.ptr:  # keep the caller's pending work (e.g. latents it just computed) in order
            stream.wait_event(caller.record())
        with stream:
            key = tuple(shapes[name] for name in self._inputs)
            slot = self._slot(key, shapes)
            views = {n: self._buffers.view(n, shapes[n], self._dtypes[n]) for n in self._inputs}
            views.update({n: self._buffers.view(n, dims_tuple(slot.context.get_tensor_shape(n)), self._dtypes[n])
                          for n in self._outputs})
            for name in self._inputs:
                self._copy_in(views[name], feeds[name], stream)
            self._bind(slot, views)
            if self._graphs is not None:
                self.last_run = self._graphs.run(key, lambda: self._enqueue(slot.context, stream))
            else:
                self._enqueue(slot.context, stream)
                self.last_run = "plain"
            result = {n: views[n] if self.return_views else views[n].copy() for n in self._outputs}
        if caller.ptr != stream.ptr:
            caller.wait_event(stream.record())
        return result

    def _slot(self, key: tuple, shapes: Mapping[str, tuple[int, ...]]) -> _Slot:
        """The context for this call: one per shape when graphs are captured, else one for all shapes."""
        slot_key = key if self._graphs is not None else None
        slot = self._slots.get(slot_key)
        if slot is None:
            if len(self._slots) >= MAX_GRAPH_SHAPES:
                self._backend.stream.synchronize()  # the evicted context may still have work queued
                old_key, old = self._slots.popitem(last=False)
                self._backend.activation.detach(old.context)
                if self._graphs is not None:  # always, in practice: one slot per shape only with graphs
                    self._graphs.drop(old_key)
            slot = self._slots[slot_key] = _Slot(self._backend.new_context(self._engine))
        self._slots.move_to_end(slot_key)
        if slot.shapes != key:
            for name in self._inputs:
                if not slot.context.set_input_shape(name, shapes[name]):
                    raise ValueError(f"{self.name}: TensorRT rejected {name} shape {shapes[name]} "
                                     f"(profile {self.profile[name]['min']}..{self.profile[name]['max']})")
            slot.shapes = key
        return slot

    def _bind(self, slot: _Slot, views: Mapping[str, Any]) -> None:
        stamp = (self._buffers.generation, self._backend.activation.generation)
        if self._graphs is not None and stamp != self._graph_stamp:
            self._graphs.clear()  # graphs baked in the old addresses
            self._graph_stamp = stamp
        if slot.stamp != stamp:
            for name, view in views.items():
                if not slot.context.set_tensor_address(name, data_pointer(view)):  # False: name or alignment refused
                    raise RuntimeError(f"{self.name}: TensorRT rejected the address of {name} (its log above says why)")
            slot.stamp = stamp

    def _copy_in(self, destination, source, stream) -> None:
        if isinstance(source, np.ndarray):  # token ids and host noise: the only host->device copies
            destination.set(np.ascontiguousarray(source, dtype=destination.dtype), stream=stream)
        else:
            destination[...] = source  # device copy (casts if the engine's I/O dtype differs)

    def _enqueue(self, context: tensorrt.IExecutionContext, stream: Any) -> None:
        if not context.execute_async_v3(stream.ptr):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed (its log above says why)")

    def _all_finite(self, outputs: Mapping[str, Any]) -> bool:
        return all(bool(self.xp.isfinite(array).all()) for array in outputs.values())


class TensorRTBackend:
    """Loads the ``.plan`` files of an engine directory; ``xp`` is CuPy (engines take and return device arrays)."""

    name = "tensorrt"

    def __init__(self, *, cuda_graphs: tuple[str, ...] = ("unet",), check_finite: tuple[str, ...] = ("vae_decoder",),
                 device: int = 0):
        purpose = "The TensorRT backend"
        self.trt = import_tensorrt(purpose)
        self.xp, gpu_name, capability = cuda_device(purpose, device)
        self.xp.cuda.Device(device).use()
        self.host = HostInfo(self.trt.__version__, gpu_name, capability)
        self.cuda_graphs, self.check_finite = tuple(cuda_graphs), tuple(check_finite)
        self.stream = self.xp.cuda.Stream(non_blocking=True)  # graph capture needs a non-default stream
        self.activation = SharedActivationMemory(self.xp)
        self.clear_cuda_error = cuda_error_clearer()  # after a failed graph capture
        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = self.trt
        self._logger: tensorrt.Logger = trt.Logger(trt.Logger.WARNING)
        self._runtime: tensorrt.Runtime = trt.Runtime(self._logger)
        self._engines: list[TensorRTEngine] = []

    def load(self, engine_dir: Path, manifest: Manifest, components: tuple[str, ...]) -> dict[str, TensorRTEngine]:
        engine_dir = Path(engine_dir)
        refusals = []
        for component in components:
            record = manifest.engine_record(component, "tensorrt")
            reasons = stale_reasons(record, manifest.components[component].get("onnx", {}).get("sha256"),
                                    self.host.tensorrt_version, self.host.gpu_name, self.host.compute_capability,
                                    plan_present=bool(record) and (engine_dir / record["file"]).is_file())
            if reasons:
                refusals.append(stale_message(component, record, reasons, self.host, engine_dir))
        if refusals:  # refuse before deserializing anything
            more = f" (and {len(refusals) - 1} more plan(s))" if len(refusals) > 1 else ""
            raise EngineDirError(refusals[0] + more)
        plans: dict[str, tuple[dict[str, Any], tensorrt.ICudaEngine]] = {}
        for component in components:
            record = manifest.engine_record(component, "tensorrt") or {}  # present: stale_reasons said so
            plans[component] = (record, self._deserialize(engine_dir / record["file"], engine_dir))
        self.activation.reserve(max(engine.device_memory_size_v2 for _, engine in plans.values()))
        engines = {}
        for component, (record, engine) in plans.items():
            fallback = (record.get("fallback") or {}).get("file")
            fallback_path = engine_dir / fallback if fallback and (engine_dir / fallback).is_file() else None
            engines[component] = self._wrap(component, manifest.spec(component), engine, engine_dir,
                                             precision=record.get("precision", "fp16"),
                                             static=bool(record.get("static")),
                                             check_finite=component in self.check_finite, fallback=fallback_path)
        return engines

    def load_plan(self, component: str, spec: IOSpec, plan: Path, engine_dir: Path, *, precision: str,
                  static: bool, check_finite: bool) -> TensorRTEngine:
        """Load one extra plan (the fp32 fallback) into the same stream and activation block (grown if needed)."""
        engine = self._deserialize(plan, engine_dir)
        self.activation.reserve(engine.device_memory_size_v2)
        return self._wrap(component, spec, engine, engine_dir, precision=precision, static=static,
                          check_finite=check_finite, fallback=None)

    def new_context(self, engine: tensorrt.ICudaEngine) -> tensorrt.IExecutionContext:
        """An execution context without device memory of its own, pointed at the shared activation block."""
        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = self.trt
        context: tensorrt.IExecutionContext | None = engine.create_execution_context(
            trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of host or device memory)")
        self.activation.attach(context, engine.device_memory_size_v2)
        return context

    def timer(self) -> EventTimer:
        return EventTimer(self.xp, self.stream)

    def close(self) -> None:
        for engine in self._engines:
            engine.close()
        self._engines.clear()

    def _wrap(self, component: str, spec: IOSpec, engine: tensorrt.ICudaEngine, engine_dir: Path, *, precision: str,
              static: bool, check_finite: bool, fallback: Path | None) -> TensorRTEngine:
        graph = component in self.cuda_graphs or component.startswith("controlnet.")  # ControlNets run every step
        wrapped = TensorRTEngine(self, component, spec, engine, precision=precision, static=static,
                                 cuda_graph=graph, check_finite=check_finite,
                                 fallback_plan=fallback, engine_dir=engine_dir)
        self._engines.append(wrapped)
        return wrapped

    def _deserialize(self, path: Path, engine_dir: Path) -> tensorrt.ICudaEngine:
        engine: tensorrt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineDirError(f"TensorRT {self.host.tensorrt_version} could not load {path.name} (corrupt, or "
                                 f"built by another TensorRT): rebuild with `{rebuild_command(engine_dir)}`")
        return engine
