"""``export(checkpoint, output)``: checkpoint -> reference models -> ONNX (-> TensorRT) -> a complete engine directory.

Everything is written into a hidden temporary directory beside ``output`` and renamed into place at the end, so an
interrupted or failed export never leaves a half-written engine directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from rtsd.config import SchedulerDefaults
from rtsd.errors import MissingDependencyError, RtsdError
from rtsd.export.manifest import Manifest, sha256_file
from rtsd.export.output_dir import check_output, make_work_dir, remove_stale_work_dirs, sigterm_as_interrupt
from rtsd.export.specs import COMPONENTS, ShapeRange, specs_for

PREDICTION_TYPES = ("epsilon", "v_prediction")
LORA_COMPONENTS = ("unet", "text_encoder")  # the sub-models LoRAs address: exported with a weights map
Progress = Callable[[str], None]


def export(checkpoint: str | Path, output: str | Path, *, shape_range: ShapeRange | None = None,
           precision: str = "fp32", backend: str = "onnx", prediction_type: str | None = None,
           overwrite: bool = False, progress: Progress | None = print, tensorrt_options: dict | None = None,
           components: Sequence[str] = COMPONENTS, clip_skip: int | None = None, check: bool = True,
           loras: Sequence[tuple[str | Path, float]] = (),
           controlnets: Sequence[tuple[str, str | Path]] = ()) -> Path:
    """Export ``checkpoint`` to the engine directory ``output``; returns its path.

    backend: "onnx" (ONNX files only, run with ONNX Runtime) or "tensorrt" (also builds fp16 .plan engines).
    prediction_type: overrides what the checkpoint's YAML (or the default, epsilon) says.
    clip_skip: condition on the N-th text-encoder layer from the end (1 = last, SD 1.x's default; 2 = penultimate,
        SD 2.x's default and a common SD 1.x choice); baked into the text encoder's ONNX and recorded in the manifest.
    check: run every engine written against the reference at the smallest exported size (DESIGN.md thresholds);
        the metrics go into the manifest, and an engine past its threshold fails the export (nothing is written).
    loras: (file, scale) pairs merged into the weights before the ONNX export, in order; recorded in the manifest.
    controlnets: (name, file) pairs: one ControlNet engine each (export/controlnet.py), checked like the others.
    """
    shape_range = shape_range or ShapeRange()
    output = Path(output)
    say = progress or (lambda message: None)
    _check_request(output, overwrite, precision, backend, prediction_type)
    with sigterm_as_interrupt():
        return _export(checkpoint, output, shape_range, precision, backend, prediction_type, say, tensorrt_options,
                       components, clip_skip, check, loras, controlnets)


def _export(checkpoint, output: Path, shape_range: ShapeRange, precision: str, backend: str,
            prediction_type: str | None, say: Progress, tensorrt_options: dict | None, components: Sequence[str],
            clip_skip: int | None, check: bool, loras: Sequence[tuple[str | Path, float]],
            controlnets: Sequence[tuple[str, str | Path]] = ()) -> Path:
    if backend == "tensorrt":
        from rtsd.export.tensorrt import require_tensorrt

        require_tensorrt()  # fail in a second, not after minutes of ONNX export
    import torch

    from rtsd.checkpoint import model_config, open_checkpoint, read_prediction_type
    from rtsd.export.onnx import export_component
    from rtsd.models import load_checkpoint

    check = check and tuple(components) == COMPONENTS
    stages = 3 + len(components) + (backend == "tensorrt") + check + bool(loras) + len(controlnets)
    stage = _Stages(stages, say)
    with stage("reading checkpoint"):
        source = open_checkpoint(checkpoint)
        dtype, component_dtypes = reference_dtypes(model_config(source).family, precision)
        models = load_checkpoint(source, dtype=dtype, device="cpu", component_dtypes=component_dtypes)
        chosen, origin = _prediction_type(prediction_type, read_prediction_type(checkpoint),
                                         Path(checkpoint).is_dir())
        config = dataclasses.replace(models.config,
                                     scheduler=dataclasses.replace(models.config.scheduler, prediction_type=chosen))
        if clip_skip is not None:
            config = _with_clip_skip(models, config, clip_skip)
        say(f"      {config.family}, prediction type {chosen} ({origin}), "
            f"text layer {config.text_encoder.output_layer} (clip skip {-config.text_encoder.output_layer})"
            + (f", VAE scale {config.vae.scaling_factor}" if config.family.startswith("sdxl") else ""))
    baked = []
    if loras:
        from rtsd.adapters.bake import bake_loras

        with stage(f"merging {len(loras)} LoRA(s) into the weights"):
            baked = bake_loras(models, loras)
    control = {}
    if controlnets:
        from rtsd.export.controlnet import load_for

        control = load_for(config, controlnets)  # a ControlNet of another family fails here, before any export

    for stale in remove_stale_work_dirs(output):
        say(f"      removed {stale.name}, left by an export that was killed")
    work = make_work_dir(output)
    try:
        with stage("writing tokenizer"):
            models.tokenizer.save(work / "tokenizer")
        specs = specs_for(config, shape_range)
        records = {}
        for name in components:
            component_precision, note = _component_precision(config, name, precision)
            with stage(f"exporting {name} to ONNX ({component_precision})"):
                if note:
                    say(f"      {note}")
                weights_map = {} if name in LORA_COMPONENTS else None  # what LoRA switching and refit follow
                files = export_component(models, name, work / f"{name}.onnx", shape_range,
                                         precision=component_precision, weights_map=weights_map)
                records[name] = {
                    "onnx": {"file": files[0].name, "data_files": [f.name for f in files[1:]],
                             "sha256": _sha256_remembered(files[0]), "precision": component_precision,
                             **({"precision_note": note} if note else {}),
                             "data_sha256": {f.name: _sha256_remembered(f) for f in files[1:]}},
                    "io": specs[name].to_dict(), "profile": _profile_json(specs[name].profile(shape_range)),
                    "engines": {}, **({"weights_map": weights_map} if weights_map is not None else {})}
        from rtsd.export.controlnet import component_name, export_controlnet

        for name, (model, info) in control.items():
            with stage(f"exporting ControlNet {name} to ONNX ({precision})"):
                records[component_name(name)] = export_controlnet(name, model, info, config, work, shape_range,
                                                                  precision)
        manifest = Manifest(model=config, shape_range=shape_range,
                            tokenizer=_tokenizer_record(models.tokenizer, work / "tokenizer"),
                            source={"checkpoint": Path(checkpoint).name, "sha256": source.sha256(),
                                    "format": source.format},
                            components=records, loras=baked)
        with stage("writing manifest"):
            manifest.write(work)
        if backend == "tensorrt":
            from rtsd.export.tensorrt import build_engines

            with stage("building TensorRT engines (fp16)"):
                plans = COMPONENTS + tuple(name for name in records if name not in COMPONENTS)  # + ControlNets
                build_engines(work, manifest, progress=say,
                              **{"components": plans, **tensorrt_build_options(config, tensorrt_options)})
        if check:
            with stage(f"checking every engine against the PyTorch reference ({shape_range.min_size} px)"):
                _check_parity(work, models, backend, shape_range, {n: m for n, (m, _) in control.items()})
        _replace_dir(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"engine directory ready: {output}")
    return output


def _check_parity(work: Path, models, backend: str, shape_range: ShapeRange, controlnets: dict | None = None) -> None:
    """Record per-engine parity in the manifest; refuse to deliver an engine directory that fails it."""
    from rtsd.export.parity import check_against_reference

    size = shape_range.min_size
    report = check_against_reference(work, models, backend="tensorrt" if backend == "tensorrt" else "onnxruntime",
                                     shapes=((1, size, size),), steps=0, controlnets=controlnets,
                                     release=True)  # the last use of the reference models: one network at a time
    manifest = Manifest.read(work)
    for check in report.checks:
        name = check.name.split()[0]
        manifest.components[name]["parity"] = {"backend": report.backend, "inputs": check.name.split()[1],
                                               "criterion": check.criterion, "passed": check.passed,
                                               **check.metrics.to_dict()}
    manifest.write(work)
    failed = [f"{c.name}: {c.criterion} not met (rel_l2 {c.metrics.rel_l2:.1e}, cosine {c.metrics.cosine:.6f})"
              for c in report.checks if not c.passed]
    if failed:
        raise RtsdError(f"engines do not match the PyTorch reference ({'; '.join(failed)}), so no engine directory "
                        f"was written; `rtsd export ... --no-check` keeps them anyway")


SDXL_VAE_NOTE = ("fp32: the SDXL VAE overflows in fp16 (NaN/black images); the fp16-fix VAE has the same tensor "
                 "shapes, so rtsd cannot tell it apart and keeps every SDXL VAE in fp32")


def tensorrt_build_options(config, options: dict | None) -> dict:
    """build_engines options: SDXL's VAE engines are always built in fp32 (it overflows in fp16)."""
    options = dict(options or {})
    if config.family.startswith("sdxl"):
        options["fp32_components"] = tuple(sorted({*(options.get("fp32_components") or ()),
                                                   "vae_decoder", "vae_encoder"}))
    return options


def reference_dtypes(family: str, precision: str) -> tuple["torch.dtype", dict]:
    """(dtype, per-network overrides) of the reference models an export traces.

    An fp16 export of SDXL traces the fp16 weights directly (as NVIDIA's demo exports SDXL): fp32 references of
    its 2.6 B-parameter UNet, traced and then converted, need ~33 GB; fp16 ones fit in 24 GB (benchmarks/README.md).
    Its VAE stays fp32 (SDXL_VAE_NOTE). SD 1.x/2.x fp16 exports trace fp32 and convert: the converter keeps the
    precision-sensitive ops in fp32, and their fp32 references fit in memory.
    """
    import torch

    if precision == "fp16" and family.startswith("sdxl"):
        return torch.float16, {"vae": torch.float32}
    return torch.float32, {}


def _component_precision(config, name: str, precision: str) -> tuple[str, str]:
    """(precision, note): SDXL's VAE stays fp32 in an fp16 export, and the manifest and log say why."""
    if precision == "fp16" and name.startswith("vae") and config.family.startswith("sdxl"):
        return "fp32", SDXL_VAE_NOTE
    return precision, ""


def _check_request(output: Path, overwrite: bool, precision: str, backend: str, prediction_type: str | None) -> None:
    check_output(output, overwrite)
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if backend not in ("onnx", "tensorrt"):
        raise ValueError(f"backend must be 'onnx' or 'tensorrt', got {backend!r}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    try:
        import torch  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "torch", "export", "Exporting a checkpoint") from None


def _with_clip_skip(models, config, clip_skip: int):
    """Rebuild the reference text encoder to stop at layer -clip_skip (same weights); return the updated config."""
    from rtsd.models.text_encoder import build_text_encoder

    if config.pooled_dim:
        raise ValueError("clip skip is not supported for SDXL (both text encoders are fixed at the penultimate "
                         "layer, as SDXL was trained); drop --clip-skip")
    layers = config.text_encoder.num_layers
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip skip must be 1..{layers} for this text encoder, got {clip_skip}")
    text_config = dataclasses.replace(config.text_encoder, output_layer=-clip_skip)
    encoder = build_text_encoder(text_config).to(next(models.text_encoder.parameters()).dtype).eval()
    encoder.load_state_dict(models.text_encoder.state_dict(), strict=True)
    models.text_encoder = encoder
    models.config = dataclasses.replace(models.config, text_encoder=text_config)
    return dataclasses.replace(config, text_encoder=text_config)


def _prediction_type(requested: str | None, from_files: str | None, folder: bool) -> tuple[str, str]:
    """Weights cannot tell epsilon from v-prediction: flag, then the config beside the weights, then the default."""
    if requested:
        return requested, "from --prediction-type"
    if from_files:
        return from_files, ("from the folder's scheduler/scheduler_config.json" if folder
                            else "from the original-config YAML beside the checkpoint")
    # The default lives once, in SchedulerDefaults (a change there must reach every export, and the tests see it).
    return (SchedulerDefaults().prediction_type,
            "default: weights cannot tell; pass --prediction-type v_prediction for 768-v models")


def _tokenizer_record(tokenizer, directory: Path) -> dict:
    return {"directory": "tokenizer", "max_length": tokenizer.max_length, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "sha256": {f.name: _sha256_remembered(f) for f in sorted(directory.iterdir()) if f.is_file()}}


def _sha256_remembered(path: Path) -> str:
    """sha256 for the manifest, also recorded as verified so the first load of this export does not hash again."""
    from rtsd.engine.verify import remember_verified

    digest = sha256_file(path)
    remember_verified({path: digest})
    return digest


def _profile_json(profile: dict) -> dict:
    return {name: {k: list(v) for k, v in corners.items()} for name, corners in profile.items()}


def _replace_dir(work: Path, output: Path) -> None:
    """Move the finished ``work`` directory to ``output``; an old ``output`` is removed only once the new one is whole."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{int(time.time())}")
        output.rename(old)
    work.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _Stages:
    """Numbered progress lines with the time each stage took: '[2/7] exporting unet to ONNX (fp32) ... 12.3 s'."""

    def __init__(self, total: int, say: Progress):
        self.total, self.done, self.say = total, 0, say

    @contextlib.contextmanager
    def __call__(self, title: str):
        self.done += 1
        start = time.perf_counter()
        self.say(f"[{self.done}/{self.total}] {title} ...")
        yield
        self.say(f"      done in {time.perf_counter() - start:.1f} s")
