"""ONNX -> fp16 TensorRT engines (``<component>.plan``), written against the TensorRT 10 Python API.

One engine per sub-model, each with one optimization profile derived from its IOSpec and the manifest's ShapeRange
(``--static`` collapses the profile to the opt shape for the fastest kernels). Builds share a timing cache kept in
the engine directory, so a rebuild (new TensorRT, other GPU, other sizes) re-times only what changed.

Precision (what stays fp32, and why so little):
  * Normalization layers (GroupNorm, LayerNorm; TensorRT parses both into INormalizationLayer) are NOT pinned.
    TensorRT already computes them in fp32 in an fp16 network (Python API, INormalizationLayer.compute_precision:
    "By default TensorRT will run the normalization computation in DataType.kFLOAT32 even in mixed precision mode
    regardless of any set builder flags to avoid overflow errors"), so the mean-of-squares overflow a pin was meant
    to prevent does not happen inside them. Pinning their
    inputs/outputs as well only added an fp16<->fp32 reformat around every norm, kept TensorRT from fusing them
    into fp16 attention/convolution kernels, and under OBEY_PRECISION_CONSTRAINTS a pinned layer without an fp32
    tactic fails the whole build. Reduce layers are not pinned either (the exported graphs carry norms as norm ops).
  * Pinned, with OBEY: in the VAE decoder, the attention Softmax and the Q.K^T MatMul feeding it (and the scaling
    between them). Its single-head attention over 512 channels at full latent resolution makes the largest logits in
    the model, and fp16 logits saturate there (the known "black image" VAE failure). These are layer types an fp32
    build of the same network implements in fp32 (the fp32 fallback plan is one), so OBEY does not leave them
    without a tactic. TF32 is cleared in those builds: the pin is for
    accuracy, and TF32 would round the pinned MatMul's inputs to 10 mantissa bits.
  * ``fp32_components`` builds a whole sub-model in fp32 (e.g. a VAE whose convolutions overflow, as the SDXL VAE's
    do; TF32 stays on there: it has fp32's range, which is what those builds need), and ``fp32_fallback``
    (default: the VAE decoder) also writes an fp32 plan that the runtime switches to if the fp16 plan ever returns
    non-finite values.

The manifest records per plan: file, sha256, precision, TensorRT version, GPU name and compute capability, the
sha256 of the ONNX it was built from, the fp32 layers and the profile; ``rtsd.engine.staleness`` judges them.
TensorRT and CuPy are imported only inside ``build_engines``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from rtsd.engine.cuda import cuda_device
from rtsd.engine.staleness import HostInfo, stale_reasons
from rtsd.engine.tensorrt import import_tensorrt
from rtsd.errors import EngineDirError, RtsdError
from rtsd.export.manifest import Manifest, sha256_file
from rtsd.export.specs import COMPONENTS, IOSpec, ShapeRange

if TYPE_CHECKING:  # the 10.x type stubs (tensorrt-stubs): pyright checks every TensorRT call against them
    import tensorrt

ATTENTION_FP32_COMPONENTS = ("vae_decoder",)  # where fp16 attention logits are known to overflow
# Layers that may sit between the Q.K^T MatMul and the Softmax (scaling, reshapes, casts). TensorRT 10 also has
# dedicated SQUEEZE/UNSQUEEZE layer types next to SHUFFLE.
_SCORE_PATH_TYPES = ("ELEMENTWISE", "SCALE", "SHUFFLE", "SQUEEZE", "UNSQUEEZE", "CAST", "UNARY")


class EngineBuildError(RtsdError, RuntimeError):
    """TensorRT could not build an engine (parse error, out of memory, unsupported layer)."""


@dataclass(frozen=True)
class LayerInfo:
    """The facts about one network layer that the fp32 policy needs (names, type name, tensor names)."""

    name: str
    type: str  # trt.LayerType name: "NORMALIZATION", "SOFTMAX", "MATRIX_MULTIPLY", ...
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    float_outputs: bool  # every output is fp32/fp16 (shape arithmetic on int tensors is never constrained)


def engine_profile(spec: IOSpec, shape_range: ShapeRange, static: bool = False) -> dict[str, dict[str, list[int]]]:
    """min/opt/max of every input as JSON-ready lists; ``static`` (or a static range) makes all three the opt shape."""
    if static and not shape_range.static:
        shape_range = dataclasses.replace(shape_range, static=True)
    return {name: {corner: list(shape) for corner, shape in corners.items()}
            for name, corners in spec.profile(shape_range).items()}


def fp32_layer_names(layers: Sequence[LayerInfo], component: str) -> list[str]:
    """Names of the layers to pin to fp32 in ``component``: the attention-logit path of the VAE decoder only (see
    the module docstring for why normalization layers are left to TensorRT's own fp32 compute)."""
    chosen: list[str] = []
    if component in ATTENTION_FP32_COMPONENTS:
        producer = {out: layer for layer in layers for out in layer.outputs}
        for layer in layers:
            if layer.type == "SOFTMAX" and layer.float_outputs:
                chosen.append(layer.name)
                chosen += [p.name for p in _score_path(layer, producer)]
    return list(dict.fromkeys(chosen))


def _score_path(softmax: LayerInfo, producer: Mapping[str, LayerInfo], max_depth: int = 8) -> list[LayerInfo]:
    """Walk back from a Softmax through scaling/reshape layers to the MatMul that made its logits."""
    path, current = [], softmax
    for _ in range(max_depth):
        feeders = [producer[t] for t in current.inputs if t in producer and producer[t].type != "CONSTANT"]
        if not feeders:
            return []
        current = feeders[0]
        if current.type == "MATRIX_MULTIPLY":
            return path + [current]
        if current.type not in _SCORE_PATH_TYPES:
            return []
        path.append(current)
    return []


def require_tensorrt() -> None:
    """Fail fast (before minutes of ONNX export) when TensorRT, CuPy or a GPU is missing."""
    import_tensorrt("Building TensorRT engines")
    cuda_device("Building TensorRT engines")


def build_engines(engine_dir: str | Path, manifest: Manifest, *, components: Iterable[str] = COMPONENTS,
                  optimization_level: int = 3, static: bool | None = None,
                  fp32_components: Iterable[str] | None = None, fp32_fallback: Iterable[str] = ("vae_decoder",),
                  rebuild_stale_only: bool = False, timing_cache: str | None = "timing.cache",
                  progress: Callable[[str], None] | None = None, refittable: bool = False) -> Manifest:
    """Build ``<component>.plan`` for each component from its ONNX in ``engine_dir``; record them in ``manifest``.

    ``static`` None: the manifest's ShapeRange decides. ``fp32_components`` None: none for a fresh build; with
    ``rebuild_stale_only``, ``static`` and ``fp32_components`` left at None keep what each plan was built with, and a
    plan that matches this machine, its ONNX and those options is kept. The manifest is written after every plan, so
    an interrupted build keeps what it finished.
    Raises MissingDependencyError (TensorRT/CuPy/GPU absent), EngineBuildError (TensorRT failed).
    """
    engine_dir = Path(engine_dir)
    components, fp32_fallback = tuple(components), set(fp32_fallback)
    unknown = sorted((set(components) | set(fp32_components or ()) | fp32_fallback) - set(manifest.components)
                     - set(COMPONENTS))  # ControlNet components (controlnet.NAME) are the manifest's own
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {', '.join(COMPONENTS)}")
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"optimization_level={optimization_level} must be 0..5 (TensorRT's builder levels)")
    say = progress or (lambda message: None)
    trt = import_tensorrt("Building TensorRT engines")
    _, gpu_name, capability = cuda_device("Building TensorRT engines")
    host = HostInfo(trt.__version__, gpu_name, capability)
    builder = _Builder(trt, engine_dir, optimization_level, timing_cache)
    refit_names = {c: [e["initializer"] for e in manifest.components[c].get("weights_map", {}).get("weights", {})
                       .values()] if refittable else [] for c in components}  # engine/refit.py

    for component in components:
        spec = manifest.spec(component)
        onnx_path = manifest.onnx_path(engine_dir, component)
        onnx_sha = manifest.components[component]["onnx"].get("sha256") or sha256_file(onnx_path)
        record = manifest.engine_record(component, "tensorrt")
        precision, is_static = build_options(record if rebuild_stale_only else None, component, manifest.shape_range,
                                             static, fp32_components)
        profile = engine_profile(spec, manifest.shape_range, is_static)
        if rebuild_stale_only:
            reasons = stale_reasons(record, onnx_sha, host.tensorrt_version, host.gpu_name, host.compute_capability,
                                    plan_present=_plan_present(engine_dir, record), precision=precision,
                                    profile=profile)
            if component in fp32_fallback and precision == "fp16" and not _plan_present(
                    engine_dir, (record or {}).get("fallback")):
                reasons.append("the fp32 fallback plan is missing")
            if not reasons and record is not None:  # no reasons: the record exists
                say(f"{component}: {record['file']} is up to date, kept")
                continue
            say(f"{component}: rebuilding ({'; '.join(reasons)})")
        started = time.perf_counter()
        say(f"{component}: building {component}.plan ({precision}, optimization level {optimization_level}, "
            f"{'static' if is_static else 'dynamic'} shapes) ...")
        record = builder.build(onnx_path, spec, engine_dir / f"{component}.plan", component, precision, profile,
                               refit_names[component])
        if component in fp32_fallback and precision == "fp16":
            say(f"{component}: building the fp32 fallback {component}.fp32.plan ...")
            fallback = builder.build(onnx_path, spec, engine_dir / f"{component}.fp32.plan", component, "fp32",
                                     profile)
            record["fallback"] = {k: fallback[k] for k in ("file", "sha256", "precision")}
        record.update(tensorrt_version=host.tensorrt_version, gpu=host.gpu_name,
                      compute_capability=host.compute_capability, onnx_sha256=onnx_sha, profile=profile,
                      static=is_static, optimization_level=optimization_level,
                      build_seconds=round(time.perf_counter() - started, 1))
        manifest.components[component].setdefault("engines", {})["tensorrt"] = record
        manifest.write(engine_dir)
        say(f"{component}: {record['file']} built in {record['build_seconds']:.0f} s "
            f"({len(record['fp32_layers'])} layers pinned to fp32)")
    return manifest


def build_options(previous: Mapping[str, Any] | None, component: str, shape_range: ShapeRange,
                  static: bool | None, fp32_components: Iterable[str] | None) -> tuple[str, bool]:
    """(precision, static) for one build: what the caller asked, else what ``previous`` was built with, else
    fp16 and the ShapeRange's static flag."""
    if fp32_components is not None:
        precision = "fp32" if component in set(fp32_components) else "fp16"
    else:
        precision = (previous or {}).get("precision", "fp16")
    if static is None:
        static = bool((previous or {}).get("static", shape_range.static))
    return precision, bool(static or shape_range.static)


def _plan_present(engine_dir: Path, record: Mapping[str, Any] | None) -> bool:
    return bool(record) and (engine_dir / record["file"]).is_file()


class _Builder:
    """One TensorRT builder and timing cache for a run of builds."""

    def __init__(self, trt_module: Any, engine_dir: Path, optimization_level: int, timing_cache: str | None):
        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = trt_module  # TensorRT, or the test fake of its builder API
        self.trt = trt_module
        self.logger: tensorrt.Logger = trt.Logger(trt.Logger.WARNING)
        self.builder: tensorrt.Builder = trt.Builder(self.logger)
        self.optimization_level = optimization_level
        self.cache_path = engine_dir / timing_cache if timing_cache else None
        self.cache_bytes = self.cache_path.read_bytes() if self.cache_path and self.cache_path.is_file() else b""

    def build(self, onnx_path: Path, spec: IOSpec, plan_path: Path, component: str, precision: str,
              profile: Mapping[str, Mapping[str, Sequence[int]]], refit_names: Sequence[str] = ()) -> dict[str, Any]:
        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = self.trt
        network: tensorrt.INetworkDefinition = self.builder.create_network(0)  # TensorRT 10: explicit batch only
        parser: tensorrt.OnnxParser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):  # resolves external data (unet.onnx.data) next to it
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: {errors[0] if errors else '?'}"
                                   f"{f' (and {len(errors) - 1} more)' if len(errors) > 1 else ''}; "
                                   f"re-export the ONNX with `rtsd export`")
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        if sorted(names) != sorted(t.name for t in spec.inputs):
            raise EngineDirError(f"{onnx_path.name} has inputs {names}, the manifest declares "
                                 f"{[t.name for t in spec.inputs]}; re-export the engine directory")

        config: tensorrt.IBuilderConfig = self.builder.create_builder_config()
        config.builder_optimization_level = self.optimization_level
        from rtsd.engine.refit import mark_refittable

        refittable = mark_refittable(trt, network, config, refit_names)
        fp32_layers: list[str] = []
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
            fp32_layers = fp32_layer_names(_layer_infos(trt, network), component)
            if fp32_layers:
                _pin_fp32(trt, network, set(fp32_layers))
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
                config.clear_flag(trt.BuilderFlag.TF32)  # pinned for accuracy: no 10-bit-mantissa MatMul inputs
        optimization_profile: tensorrt.IOptimizationProfile = self.builder.create_optimization_profile()
        for name, corners in profile.items():
            optimization_profile.set_shape(name, tuple(corners["min"]), tuple(corners["opt"]), tuple(corners["max"]))
        if config.add_optimization_profile(optimization_profile) < 0:  # -1: TensorRT rejected the profile
            raise EngineBuildError(f"TensorRT rejected the optimization profile {dict(profile)} for "
                                   f"{onnx_path.name} (see its log above); re-export the engine directory")
        cache: tensorrt.ITimingCache | None = None
        if self.cache_path is not None:
            # A blob TensorRT cannot read (another TensorRT version, a truncated file) may come back as None; a cache
            # from another GPU is refused by set_timing_cache (False with ignore_mismatch=False): start afresh.
            cache = config.create_timing_cache(self.cache_bytes) if self.cache_bytes else None
            if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, ignore_mismatch=False)

        serialized: tensorrt.IHostMemory | None = self.builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT failed to build {plan_path.name} (see its log above); out of GPU "
                                   f"memory is the usual cause: lower --max-size/--max-batch or build with --static")
        data = memoryview(serialized)
        digest = hashlib.sha256(data).hexdigest()
        _write_atomic(plan_path, data)
        if cache is not None and self.cache_path is not None:
            self.cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
            _write_atomic(self.cache_path, self.cache_bytes)
        return {"file": plan_path.name, "sha256": digest, "precision": precision, "fp32_layers": fp32_layers,
                "refittable": refittable}


def _layer_infos(trt_module: Any, network: tensorrt.INetworkDefinition) -> list[LayerInfo]:
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = trt_module
    floats = (trt.float32, trt.float16)
    infos = []
    for i in range(network.num_layers):
        layer: tensorrt.ILayer = network.get_layer(i)
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        infos.append(LayerInfo(layer.name, layer.type.name, tuple(t.name for t in inputs if t is not None),
                               tuple(t.name for t in outputs), all(t.dtype in floats for t in outputs)))
    return infos


def _pin_fp32(trt_module: Any, network: tensorrt.INetworkDefinition, names: set[str]) -> None:
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = trt_module
    for i in range(network.num_layers):
        layer: tensorrt.ILayer = network.get_layer(i)
        if layer.name in names:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def _write_atomic(path: Path, data) -> None:
    """Write to a sibling temporary file, then rename: a reader never sees half a plan."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
