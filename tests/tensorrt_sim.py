"""A TensorRT 10 stand-in for testing rtsd's TensorRT backend where TensorRT itself cannot run.

The stand-in implements exactly the surface ``rtsd.engine.tensorrt`` calls (Runtime, deserialize_cuda_engine, engine
and execution-context methods) and executes each "plan" as a small known function of its inputs, so every piece of
rtsd around TensorRT is exercised for real: refusal of stale plans, the shared activation block, grow-only buffers,
tensor addresses, profile checks, CUDA-graph capture and replay, the fp32 fallback, and the runtime loop on the
engines' array module. It never stands in for TensorRT's numerics; the real-TensorRT tests are in
test_cuda_device.py (``-m tensorrt``).

Two launchers run the enqueued work:
- ``cpu``: "device" memory is host memory (ctypes views), streams are recorded/replayed in Python (CI, no GPU);
- ``cuda``: real CuPy device memory, the work is launched as CuPy kernels on the real stream handed to
  ``execute_async_v3``, so real CUDA graphs capture it (needs a GPU).

The stand-in functions (``COMPUTE``) are written once against an array module and write into their outputs in place;
the UNet's allocates nothing, as work under CUDA-graph capture must.

The stand-in is as strict as TensorRT where rtsd could get a call wrong. Each rule names what it mirrors; "API" is
TensorRT 10.13's Python API documentation (the bindings' docstrings, as shipped in ``tensorrt-stubs``), "header"
is NvInferRuntime.h:
- R1 ``set_device_memory(memory, size)``: memory 256-byte aligned, size at least the engine's
  ``device_memory_size_v2`` (API, IExecutionContext.set_device_memory), and the block must be alive (undefined
  behaviour otherwise: here an error).
- R2 ``set_tensor_address``: False for a name that is not an I/O tensor of the engine, False for an address without
  256-byte alignment (header, setTensorAddress: "Return false if the provided name does not map to an input or
  output tensor", "The pointer must have at least 256-byte alignment").
- R3 ``set_input_shape``: False for an unknown name, an output, or a shape outside the profile; ``get_tensor_shape``
  of an unknown name gives no shape (API: returns Dims of -1s; here an error, rtsd never asks).
- R4 activation memory differs per plan: an fp32 plan needs more than its fp16 twin (``device_memory_size_v2`` is
  per engine), so loading the fp32 VAE fallback grows the shared block.
- R5 the first run of a context at new input shapes does lazy work that is not capturable: an enqueue at unflushed
  shapes on a capturing stream invalidates the capture (header, the known-issue note on enqueueV2/enqueueV3: with
  dynamic shapes the first enqueue after setting input shapes fails stream capture because of resource allocation;
  call it once before capturing the graph).
- R6 injected failures: ``execute_async_v3`` returning False (``SimEngine.fail_execute``), a capture that cannot
  end (``SimStream.fail_capture``), device memory that cannot be allocated (``SimCupy.out_of_memory``).
- R7 ``trt.nptype`` raises TypeError for bfloat16/fp8 (TensorRT's python/tensorrt/__init__.py: "fp8 and bfloat16
  have no equivalent numpy type").
- R8 capture mode: ``begin_capture`` must be given a mode, as trtexec captures thread-local
  (cudaStreamCaptureModeThreadLocal); a capture that was invalidated fails at ``end_capture``.
- R9 (builder fake in test_tensorrt_cpu.py) OBEY_PRECISION_CONSTRAINTS: "Require that layers execute in specified
  precisions. Build fails otherwise." (API, BuilderFlag); TF32 "Enabled by default".
"""

from __future__ import annotations

import ctypes
import math
import types
import weakref
from pathlib import Path

import numpy as np
from PIL import Image

from rtsd.engine.tensorrt import request_size
from rtsd.export.manifest import Manifest
from rtsd.export.specs import COMPONENTS, ShapeRange, specs_for
from rtsd.export.tensorrt import engine_profile
from rtsd.tokenizer import Tokenizer

SIM_TENSORRT_VERSION = "10.8.0.43"


# ---------------------------------------------------------------- the stand-in "plans"

def _fill_mean(xp, inputs, outputs, overflow=False):
    """Every output = the mean of the first input (or inf: a plan that overflows fp16)."""
    value = math.inf if overflow else float(next(iter(inputs.values())).mean())
    for out in outputs.values():
        out[...] = value


def _unet_linear(xp, inputs, outputs, overflow=False):
    """model_output = 2 * sample + timestep (per row)."""
    out = outputs["model_output"]
    xp.multiply(inputs["sample"], 2, out=out)
    out += inputs["timestep"][:, None, None, None]


BOOKKEEPING = {"text_encoder": _fill_mean, "unet": _unet_linear, "vae_decoder": _fill_mean, "vae_encoder": _fill_mean}


def _text_model(xp, inputs, outputs, overflow=False):
    """hidden_states[b, k, :] = (id_k mod 97) / 97 - 0.5: different prompts give different contexts."""
    ids = inputs["input_ids"]
    outputs["hidden_states"][...] = ((ids % 97) / 97.0 - 0.5)[:, :, None]


def _unet_model(xp, inputs, outputs, overflow=False):
    """model_output = sample + context[:, 1:5, 0] per channel + timestep / 1000, in place (capturable)."""
    out = outputs["model_output"]
    xp.multiply(inputs["timestep"][:, None, None, None], 1e-3, out=out)
    out += inputs["encoder_hidden_states"][:, 1:5, 0][:, :, None, None]
    out += inputs["sample"]


def _decoder_model(xp, inputs, outputs, overflow=False):
    """images = 0.5 + 0.5 tanh(latent[:, :3]), each latent pixel upsampled to 8x8 (inf if the plan 'overflows')."""
    latent, images = inputs["latent"], outputs["images"]
    rows, _, h, w = latent.shape
    blocks = images.reshape(rows, 3, h, 8, w, 8)
    blocks[...] = (0.5 + 0.5 * xp.tanh(latent[:, :3]))[:, :, :, None, :, None]
    if overflow:
        images[:, :, 0, 0] = math.inf


def _encoder_model(xp, inputs, outputs, overflow=False):
    """latent = (2 * images - 1) sampled every 8 pixels, the 4th channel repeating the first."""
    images, latent = inputs["images"], outputs["latent"]
    latent[:, :3] = 2 * images[:, :, ::8, ::8] - 1
    latent[:, 3] = latent[:, 0]


MODEL_LIKE = {"text_encoder": _text_model, "unet": _unet_model, "vae_decoder": _decoder_model,
              "vae_encoder": _encoder_model}


def _unet_with_residuals(xp, inputs, outputs, overflow=False):
    """_unet_model + the first 4 channels of down_residual_0 and mid_residual at their top-left pixel (in place)."""
    _unet_model(xp, inputs, outputs)
    out = outputs["model_output"]
    xp.add(out, inputs["down_residual_0"][:, :4, :1, :1], out=out)
    xp.add(out, inputs["mid_residual"][:, :4, :1, :1], out=out)


def _controlnet_model(xp, inputs, outputs, overflow=False):
    """residual k = conditioning_scale[k] * (control_image[:, 0, 0, 0] + sample[:, 0, 0, 0]) per row (in place)."""
    for k, out in enumerate(outputs.values()):
        xp.multiply(inputs["control_image"][:, :1, :1, :1], inputs["conditioning_scale"][k], out=out)
        xp.add(out, inputs["sample"][:, :1, :1, :1] * inputs["conditioning_scale"][k], out=out)


def controlnet_compute(names, base=None) -> dict:
    """Stand-in functions for an engine directory with ControlNets ``names``: the UNet adds its residuals."""
    return {**(base or MODEL_LIKE), "unet": _unet_with_residuals,
            **{f"controlnet.{name}": _controlnet_model for name in names}}


# ---------------------------------------------------------------- launchers: where "device" memory and streams live

class FakeStream:
    """CUDA stream capture semantics: work issued while capturing is recorded, not run, until the graph launches.

    R8: ``begin_capture`` needs an explicit mode (``capture_modes`` keeps them); a capture that something invalidated
    (``invalidate``: R5's lazy work, a failing enqueue) or that ``fail_capture`` breaks raises at ``end_capture``,
    after which the stream is usable again, as with cudaStreamEndCapture."""

    def __init__(self, fail_capture=False):
        self.capturing, self.recorded, self.fail_capture, self.launched = False, None, fail_capture, 0
        self.capture_modes, self.invalidated = [], None

    def begin_capture(self, *, mode):
        if self.capturing:
            raise RuntimeError("cudaErrorIllegalState: the stream is already capturing")
        self.capturing, self.recorded, self.invalidated = True, [], None
        self.capture_modes.append(mode)

    def invalidate(self, why):
        self.invalidated = self.invalidated or why

    def end_capture(self):
        if not self.capturing:
            raise RuntimeError("cudaErrorIllegalState: the stream is not capturing")
        self.capturing = False
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        if self.invalidated:
            raise RuntimeError(f"cudaErrorStreamCaptureInvalidated: {self.invalidated}")
        work = self.recorded

        def launch(stream=None):
            assert stream is self
            self.launched += 1
            for item in work:
                item()
        return types.SimpleNamespace(launch=launch)

    def issue(self, work):
        self.recorded.append(work) if self.capturing else work()


class SimStream(FakeStream):
    streams: dict = {}

    def __init__(self, non_blocking=False):
        super().__init__()
        self.syncs = 0
        self.ptr = 1000 + len(SimStream.streams)
        SimStream.streams[self.ptr] = self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self):
        return object()

    def wait_event(self, event):
        pass

    def synchronize(self):
        self.syncs += 1


class DevArray(np.ndarray):
    """A host array with CuPy's .set/.get (``memory``: the SimMemory it lives in, when allocated by SimCupy.empty)."""

    memory = None

    def __array_finalize__(self, obj):
        self.memory = getattr(obj, "memory", None)  # views keep the block alive too

    def set(self, host, stream=None):
        self[...] = host

    def get(self, stream=None):
        return np.array(self)


class SimOutOfMemoryError(MemoryError):
    """Stands in for cupy.cuda.memory.OutOfMemoryError."""


class SimMemory:
    """A device block (CuPy's MemoryPointer): ``ptr`` is valid while this object lives; dropping it frees it."""

    ALIGN = 512  # CuPy's pool hands out 512-byte aligned blocks

    def __init__(self, cupy, nbytes):
        raw = np.zeros(nbytes + self.ALIGN, np.uint8)
        start = -raw.ctypes.data % self.ALIGN
        self.array = raw[start:start + nbytes]
        self.ptr, self.size = self.array.ctypes.data, nbytes
        cupy.live[self.ptr] = nbytes
        weakref.finalize(self, cupy.live.pop, self.ptr, None)


class SimCupy:
    """The CuPy surface the backend and the runtime loop use, over host memory.

    ``live`` maps the address of every block not yet freed to its size (R1: contexts must point at live memory);
    ``out_of_memory`` makes the next ``cuda.alloc`` calls (the activation block) fail (R6)."""

    uint8, float32 = np.uint8, np.float32
    isfinite = staticmethod(np.isfinite)

    @staticmethod
    def concatenate(arrays, axis=0):  # a device array, as cupy.concatenate returns (np.concatenate drops the type)
        return np.concatenate(arrays, axis=axis).view(DevArray)

    def __init__(self):
        default = SimStream()
        self.blocks, self.live, self.out_of_memory = [], {}, False
        self.cuda = types.SimpleNamespace(
            Stream=SimStream, get_current_stream=lambda: default, alloc=self._alloc,
            Device=lambda i=0: types.SimpleNamespace(use=lambda: None, synchronize=lambda: None))

    def _alloc(self, nbytes):
        if self.out_of_memory:
            raise SimOutOfMemoryError(f"Out of memory allocating {nbytes:,} bytes")
        block = SimMemory(self, nbytes)
        self.blocks.append(weakref.ref(block))
        return block

    def empty(self, n, dtype):
        block = SimMemory(self, n * np.dtype(dtype).itemsize)
        array = block.array.view(dtype).view(DevArray)
        array.memory = block  # the array keeps its block alive, as a CuPy array keeps its MemoryPointer
        return array

    @staticmethod
    def asarray(array):
        return np.array(array).view(DevArray)

    @staticmethod
    def full(shape, value, dtype=np.float32):
        return np.full(shape, value, dtype).view(DevArray)


def cpu_launcher():
    """(array at an address, launch work on a stream pointer) for host "device" memory and SimStreams."""
    def at(address, shape, dtype):
        dtype = np.dtype(dtype)
        raw = (ctypes.c_char * (math.prod(shape) * dtype.itemsize)).from_address(address)
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def launch(stream_ptr, work):
        SimStream.streams[stream_ptr].issue(lambda: work(np, at))
    return launch


def cuda_launcher(cupy):
    """Launch the work as CuPy kernels on the real stream (captured into a CUDA graph when the stream captures)."""
    def at(address, shape, dtype):
        dtype = np.dtype(dtype)
        memory = cupy.cuda.UnownedMemory(address, math.prod(shape) * dtype.itemsize, None)
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))

    def launch(stream_ptr, work):
        with cupy.cuda.ExternalStream(stream_ptr):
            work(cupy, at)
    return launch


# ---------------------------------------------------------------- the TensorRT API surface

ALIGNMENT = 256  # R1, R2


class SimContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None
        self.flushed = None  # R5: the input shapes the last run was at

    def set_device_memory(self, memory, size):  # R1
        live = self.engine.cupy.live if self.engine.cupy is not None else None
        if memory % ALIGNMENT:
            raise SimTensorRTError(f"set_device_memory: {memory:#x} is not 256-byte aligned")
        if size < self.engine.device_memory_size_v2:
            raise SimTensorRTError(f"set_device_memory: {size} bytes, the engine needs "
                                   f"{self.engine.device_memory_size_v2}")
        if live is not None and live.get(memory, -1) < size:
            raise SimTensorRTError(f"set_device_memory: {memory:#x} is not a live block of {size} bytes")
        self.memory = (memory, size)

    def set_input_shape(self, name, shape):  # R3
        corners = self.engine.profile.get(name)
        if corners is None or len(shape) != len(corners["min"]):
            return False
        self.shapes[name] = tuple(shape)
        return all(lo <= v <= hi for v, lo, hi in zip(shape, corners["min"], corners["max"]))

    def get_tensor_shape(self, name):
        if name not in self.engine.names:
            raise SimTensorRTError(f"get_tensor_shape: no tensor named {name!r}")
        rows, h, w = request_size(self.engine.spec, self.shapes)
        return self.engine.spec.shapes(rows, h or 8, w or 8)[name]

    def set_tensor_address(self, name, address):  # R2
        if name not in self.engine.names or address % ALIGNMENT:
            return False
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle):
        engine = self.engine
        assert self.memory is not None, "a context ran without activation memory"
        missing = [n for n in engine.names if n not in self.addresses]
        if missing or engine.fail_execute:  # R6 (and TensorRT refuses to run with unbound tensors)
            return False
        engine.launches += 1
        spec, shapes, addresses, memory = engine.spec, dict(self.shapes), dict(self.addresses), self.memory
        out_shapes = {t.name: self.get_tensor_shape(t.name) for t in spec.outputs}
        stream = SimStream.streams.get(stream_handle)
        key = tuple(sorted(shapes.items()))
        if self.flushed != key:  # R5: lazy shape-dependent work on the first run at these shapes
            if stream is not None and stream.capturing:
                stream.invalidate(f"{engine.name}: first enqueue at new shapes ran deferred updates under capture")
                return False
            self.flushed = key
        live = engine.cupy.live if engine.cupy is not None else None

        def work(xp, at):  # addresses and shapes baked at enqueue time, like a captured kernel's parameters
            if live is not None and live.get(memory[0], -1) < memory[1]:  # R1: never run on freed memory
                raise SimTensorRTError(f"{engine.name}: ran on freed activation memory {memory[0]:#x}")
            engine.runs += 1
            inputs = {t.name: at(addresses[t.name], shapes[t.name], t.dtype) for t in spec.inputs}
            outputs = {t.name: at(addresses[t.name], out_shapes[t.name], t.dtype) for t in spec.outputs}
            engine.compute(xp, inputs, outputs, overflow=engine.overflow)
        engine.launch(stream_handle, work)
        return True


class SimTensorRTError(AssertionError):
    """A call real TensorRT would refuse or that is undefined behaviour there (a test failure, never caught)."""


class SimEngine:
    ACTIVATION_BYTES = {"text_encoder": 1000, "unet": 5000, "vae_decoder": 3000, "vae_encoder": 2000,
                        "controlnet": 4000}
    FP32_FACTOR = 4  # R4: an fp32 plan of the same network needs more activation memory (here more than the UNet)

    def __init__(self, name, spec, shape_range, compute, launch, overflow=False, precision="fp16", cupy=None,
                 io_dtype=None):
        self.name, self.spec, self.compute, self.launch, self.overflow = name, spec, compute, launch, overflow
        self.cupy, self.io_dtype, self.fail_execute = cupy, io_dtype, False
        self.launches, self.runs, self.contexts = 0, 0, []
        self.profile = {n: {k: tuple(v) for k, v in c.items()} for n, c in engine_profile(spec, shape_range).items()}
        self.device_memory_size_v2 = self.ACTIVATION_BYTES[name.split(".")[0]] * (self.FP32_FACTOR if precision == "fp32"
                                                                                   else 1)
        self.names = [t.name for t in spec.inputs + spec.outputs]
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "in" if name in self.profile else "out"

    def get_tensor_dtype(self, name):
        if self.io_dtype is not None:
            return self.io_dtype
        return next(np.dtype(t.dtype) for t in self.spec.inputs + self.spec.outputs if t.name == name)

    def get_tensor_profile_shape(self, name, index):
        return [self.profile[name][k] for k in ("min", "opt", "max")]

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        self.contexts.append(SimContext(self))
        return self.contexts[-1]


NO_NUMPY_TYPE = ("BF16", "FP8")  # R7


class SimTensorRT:
    """The ``tensorrt`` module as the backend sees it; a plan file's text says which engine it is ("unet:ok";
    kinds: ok, overflow, corrupt, fp32 (an fp32 plan: more activation memory), bf16io / fp8io (I/O tensors of a type
    without a NumPy equivalent))."""

    __version__ = SIM_TENSORRT_VERSION
    TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

    def __init__(self, config, shape_range, compute=None, launch=None, cupy=None, controlnets=()):
        self.deserialized = []
        specs, compute, launch = _specs(config, shape_range, controlnets), compute or BOOKKEEPING, launch or cpu_launcher()
        sim = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                name, _, kind = data.decode().partition(":")
                if kind == "corrupt":
                    return None
                io_dtype = {"bf16io": "BF16", "fp8io": "FP8"}.get(kind)
                sim.deserialized.append(SimEngine(name, specs[name], shape_range, compute[name], launch,
                                                  overflow=kind == "overflow", cupy=cupy, io_dtype=io_dtype,
                                                  precision="fp32" if kind == "fp32" else "fp16"))
                return sim.deserialized[-1]
        self.Runtime = Runtime
        self.Builder = lambda logger: None  # never called by the runtime; there so the module looks like TensorRT

    @staticmethod
    def nptype(dtype):  # R7
        if dtype in NO_NUMPY_TYPE:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return dtype


def _specs(config, shape_range, controlnets=()):
    """The components' specs, with ControlNet components ``controlnet.NAME`` for ``controlnets``."""
    from rtsd.export.specs import controlnet_spec

    return {**specs_for(config, shape_range),
            **{f"controlnet.{n}": controlnet_spec(config, f"controlnet.{n}") for n in controlnets}}


def sim_manifest(config, shape_range: ShapeRange, gpu: str, capability: str, *, overflow=("vae_decoder",),
                 fallback=("vae_decoder",), controlnets=()) -> tuple[Manifest, dict[str, str]]:
    """A manifest whose TensorRT records match the given machine, and the plan files' contents by file name."""
    specs, components, plans = _specs(config, shape_range, controlnets), {}, {}
    for name in specs:
        plans[f"{name}.plan"] = f"{name}:{'overflow' if name in overflow else 'ok'}"
        record = {"file": f"{name}.plan", "precision": "fp16", "tensorrt_version": SIM_TENSORRT_VERSION, "gpu": gpu,
                  "compute_capability": capability, "onnx_sha256": "a" * 64, "static": False, "fallback": None}
        if name in fallback:
            plans[f"{name}.fp32.plan"] = f"{name}:fp32"
            record["fallback"] = {"file": f"{name}.fp32.plan", "precision": "fp32"}
        components[name] = {"io": specs[name].to_dict(), "onnx": {"file": f"{name}.onnx", "sha256": "a" * 64},
                            "engines": {"tensorrt": record}}
        if name.startswith("controlnet."):
            components[name]["controlnet"] = {"name": name.split(".", 1)[1], "family": config.family}
    tokenizer = {"directory": "tokenizer", "max_length": 77, "pad_token_id": config.text_encoder.pad_token_id}
    return Manifest(model=config, shape_range=shape_range, source={}, tokenizer=tokenizer,
                    components=components), plans


def write_sim_engine_dir(directory: Path, config, shape_range: ShapeRange, gpu: str, capability: str,
                         **kw) -> Manifest:
    """An engine directory the Runtime opens with the stand-in: manifest, tokenizer, plan files, empty ONNX names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest, plans = sim_manifest(config, shape_range, gpu, capability, **kw)
    for file, text in plans.items():
        (directory / file).write_text(text)
    for name in manifest.components:
        (directory / f"{name}.onnx").write_bytes(b"")  # never read with backend="tensorrt"
    Tokenizer.default(pad_token_id=config.text_encoder.pad_token_id).save(directory / "tokenizer")
    manifest.write(directory)
    return manifest


class HostStandIn:
    """The same stand-in functions run directly in NumPy behind the Engine protocol: the host oracle for the loop."""

    name = "host-stand-in"

    def __init__(self, config, compute=None, controlnets=()):
        self.specs, self.compute = _specs(config, None, controlnets), compute or MODEL_LIKE

    def load(self, engine_dir=None, manifest=None, components=COMPONENTS):
        return {name: _HostEngine(name, self.specs[name], self.compute[name]) for name in components}


class _HostEngine:
    xp = np

    def __init__(self, name, spec, compute):
        self.name, self.spec, self._compute = name, spec, compute

    def allocate(self, shapes):
        pass

    def infer(self, feeds):
        self.spec.validate(feeds)
        rows, h, w = request_size(self.spec, {k: v.shape for k, v in feeds.items()})
        shapes = self.spec.shapes(rows, h or 8, w or 8)
        outputs = {t.name: np.empty(shapes[t.name], t.dtype) for t in self.spec.outputs}
        self._compute(np, dict(feeds), outputs)
        return outputs

    def to_host(self, array):
        return array

    def synchronize(self):
        pass

    def close(self):
        pass


def generate_with_latents(runtime, to_numpy, **request):
    """``runtime.generate(**request)`` -> (final latents as NumPy, images as uint8 arrays, the latents' type)."""
    seen = []
    result = runtime.generate(callback=lambda i, total, t, x: seen.append(x), **request)
    return to_numpy(seen[-1]), [np.asarray(image) for image in result.images], type(seen[-1])


# Requests the loop comparisons run: CFG with 2 prompts (4 UNet rows), a stochastic and a multistep scheduler,
# non-square, and img2img through the VAE encoder.
LOOP_REQUESTS = (
    dict(prompt=["a red fox in the snow", "a lighthouse"], negative_prompt="blurry", steps=6, height=64, width=128,
         seed=3, scheduler="dpmpp_2m"),
    dict(prompt="a red fox in the snow", steps=5, height=128, width=64, seed=4, scheduler="euler_a",
         guidance_scale=5.0),
    dict(prompt="a red fox in the snow", steps=8, height=64, width=64, seed=5, scheduler="ddim", strength=0.6,
         image=Image.fromarray(np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8))),
)


def assert_device_equals_host(device, host, request: dict) -> np.ndarray:
    """Generate ``request`` through the simulated device backend and through the host stand-in: the device loop
    returns the device array type and exactly the host loop's latents and images. Returns the host latents."""
    latents, images, kind = generate_with_latents(device, np.asarray, **request)
    expected, expected_images, _ = generate_with_latents(host, np.asarray, **request)
    assert kind is DevArray, f"the loop returned {kind.__name__}, not the device array type"
    assert np.abs(expected).max() > 0.1
    np.testing.assert_array_equal(latents, expected)
    for got, want in zip(images, expected_images):
        np.testing.assert_array_equal(got, want)
    return expected


def install_sim(monkeypatch, directory, config, shape_range):
    """A simulated TensorRT + CuPy patched into rtsd's TensorRT backend, and ``directory`` made an engine directory
    whose plans name what the simulator builds: (trt, cp, dir, manifest)."""
    from rtsd.engine import tensorrt as trt_backend

    cp = SimCupy()
    trt = SimTensorRT(config, shape_range, cupy=cp)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda purpose: trt)
    monkeypatch.setattr(trt_backend, "cuda_device", lambda purpose, device=0: (cp, "Sim GPU", "9.0"))
    manifest, plans = sim_manifest(config, shape_range, "Sim GPU", "9.0")
    for file, text in plans.items():
        (directory / file).write_text(text)
    return types.SimpleNamespace(trt=trt, cp=cp, dir=directory, manifest=manifest)
