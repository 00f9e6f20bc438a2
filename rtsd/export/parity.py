"""Numerical parity of engines against the PyTorch reference: one library function for export, tests and the CLI.

Metrics (computed in float64): max-abs error, relative L2 error ||a - r|| / ||r||, cosine similarity, and PSNR
(peak = the reference's max |value|, as Apple's torch2coreml compute_psnr; images use their 0..1 range).
Thresholds are those of DESIGN.md, named here once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from rtsd.export.specs import COMPONENTS

# fp32 ONNX (ONNX Runtime) vs fp32 reference, per sub-model.
FP32_MAX_REL_L2 = 1e-4
# fp16 engines vs fp32 reference, per sub-model.
FP16_MIN_COSINE = 0.999
# Decoded images end to end, same seed and latents.
MIN_IMAGE_PSNR_DB = 30.0


@dataclass(frozen=True)
class Metrics:
    max_abs: float
    rel_l2: float
    cosine: float
    psnr: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def compare(actual, reference, peak: float | None = None) -> Metrics:
    """Error of ``actual`` against ``reference`` (same shape)."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    r = np.asarray(reference, dtype=np.float64).ravel()
    if a.shape != r.shape:
        raise ValueError(f"cannot compare arrays of {a.size} and {r.size} elements")
    diff = a - r
    ref_norm, act_norm = np.linalg.norm(r), np.linalg.norm(a)
    rel_l2 = float(np.linalg.norm(diff) / ref_norm) if ref_norm else float(np.linalg.norm(diff))
    cosine = float(a @ r / (act_norm * ref_norm)) if act_norm and ref_norm else float(act_norm == ref_norm)
    return Metrics(max_abs=float(np.abs(diff).max(initial=0.0)), rel_l2=rel_l2, cosine=cosine,
                   psnr=psnr(a, r, peak if peak is not None else float(np.abs(r).max(initial=0.0))))


def psnr(actual, reference, peak: float = 1.0) -> float:
    mse = float(np.mean((np.asarray(actual, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@dataclass
class Check:
    name: str  # "unet 2x4x32x48" or "end-to-end"
    metrics: Metrics
    criterion: str  # e.g. "rel_l2 < 1e-04"
    passed: bool


@dataclass
class ParityReport:
    precision: str
    backend: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def table(self) -> str:
        lines = [f"parity of {self.backend} ({self.precision}) vs the PyTorch fp32 reference",
                 f"{'check':34} {'max-abs':>10} {'rel-L2':>10} {'cosine':>10} {'PSNR dB':>8}  criterion"]
        for c in self.checks:
            m = c.metrics
            lines.append(f"{c.name:34} {m.max_abs:10.3e} {m.rel_l2:10.3e} {m.cosine:10.6f} {m.psnr:8.2f}  "
                         f"{c.criterion} {'ok' if c.passed else 'FAIL'}")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"precision": self.precision, "backend": self.backend, "passed": self.passed,
                "checks": [{"name": c.name, "criterion": c.criterion, "passed": c.passed, **c.metrics.to_dict()}
                           for c in self.checks]}


def judge(name: str, metrics: Metrics, precision: str) -> Check:
    """Apply DESIGN.md's per-sub-model threshold for an engine of ``precision``."""
    if precision == "fp32":
        return Check(name, metrics, f"rel_l2 < {FP32_MAX_REL_L2:.0e}", metrics.rel_l2 < FP32_MAX_REL_L2)
    return Check(name, metrics, f"cosine > {FP16_MIN_COSINE}", metrics.cosine > FP16_MIN_COSINE)


def check_engine_dir(engine_dir: str | Path, checkpoint: str | Path, *, backend: str | None = None,
                     shapes: tuple[tuple[int, int, int], ...] = ((1, 256, 256), (2, 256, 320)),
                     steps: int = 4, progress: Callable[[str], None] | None = None,
                     controlnets: dict[str, str | Path] | None = None) -> ParityReport:
    """Run every sub-model of ``engine_dir`` and the reference on the same inputs, then one short generation.

    shapes: (images, height, width) per sub-model check, clipped into the exported range.
    controlnets: {name: file} of the directory's ControlNets (default: the files recorded at export, when they are
    still there with the same sha256; a ControlNet without its file is not checked, and the report says so).
    """
    import torch

    from rtsd.export.controlnet import reference_controlnets
    from rtsd.models import load_checkpoint

    models = load_checkpoint(checkpoint, dtype=torch.float32, device="cpu")
    return check_against_reference(engine_dir, models, backend=backend, shapes=shapes, steps=steps,
                                   progress=progress,
                                   controlnets=reference_controlnets(engine_dir, controlnets or {}, progress))


def check_against_reference(engine_dir: str | Path, models, *, backend: str | None = None,
                            shapes: tuple[tuple[int, int, int], ...] = ((1, 256, 256),), steps: int = 4,
                            progress: Callable[[str], None] | None = None,
                            controlnets: dict | None = None, release: bool = False) -> ParityReport:
    """``check_engine_dir`` with the reference models already loaded (``export`` checks what it just wrote).

    steps=0 skips the end-to-end generation. controlnets: {name: reference ControlNet module} to check.
    release: drop each reference network from ``models`` once its engines are checked (``export``: nothing uses
    them afterwards; not with steps > 0, whose generation needs them all).

    One network at a time: its reference runs first (a network held in fp16, as in SDXL's fp16 export, runs in fp32
    for the check), then its engine is loaded, run on the same inputs and closed. With ``release`` the check needs
    the larger of one engine and one fp32 network, not all of them at once (full-size SDXL within 24 GB).
    """
    if release and steps > 0:
        raise ValueError("release=True drops the reference networks the end-to-end generation needs; use steps=0")
    from rtsd.runtime import open_engine_dir

    say = progress or (lambda message: None)
    engine_dir = Path(engine_dir)
    manifest, chosen = open_engine_dir(engine_dir, backend)
    precisions = {_precision(manifest, name, chosen.name) for name in COMPONENTS}
    report = ParityReport(precision="fp16" if "fp16" in precisions else "fp32", backend=chosen.name)
    r = manifest.shape_range
    sizes = []
    for images, height, width in shapes:
        height, width = (min(max(v, r.min_size), r.max_size) for v in (height, width))
        sizes.append((min(max(images, r.min_batch), r.max_batch), height, width))
    for index, name in enumerate(COMPONENTS):
        last_use = _network(name) not in {_network(later) for later in COMPONENTS[index + 1:]}
        for check in _component_checks(engine_dir, manifest, chosen, models, name, sizes, release and last_use):
            say(f"      {check.name}: rel_l2 {check.metrics.rel_l2:.2e} cosine {check.metrics.cosine:.6f}")
            report.checks.append(check)
    for name, model in (controlnets or {}).items():
        from rtsd.export.controlnet import component_name, controlnet_parity

        component = component_name(name)
        engine = chosen.load(engine_dir, manifest, (component,))[component]
        try:
            for images, height, width in sizes:
                check = controlnet_parity(engine, model, r, _precision(manifest, component, chosen.name),
                                          images=images, height=height, width=width)
                say(f"      {check.name}: rel_l2 {check.metrics.rel_l2:.2e} cosine {check.metrics.cosine:.6f}")
                report.checks.append(check)
        finally:
            engine.close()
    if steps > 0:
        report.checks.append(_end_to_end(engine_dir, chosen.name, models, manifest, steps))
    return report


def _component_checks(engine_dir: Path, manifest, backend, models, name: str, sizes, release: bool) -> list[Check]:
    """Run the reference of ``name`` in fp32 on every size (then drop it if ``release``), then its engine."""
    import gc

    from rtsd.engine.torch import TorchBackend

    spec = manifest.spec(name)
    feeds = []
    for images, height, width in sizes:
        rows = images * spec.batch_factor
        feeds.append(spec.sample_inputs(rows, height, width, seed=rows + height + width))
    with _in_fp32(models, name, restore=not release):
        reference = TorchBackend(models, manifest.shape_range).load(components=(name,))[name]
        expected = []
        for feed in feeds:
            out = reference.infer(feed)
            expected.append({t.name: reference.to_host(out[t.name]) for t in spec.outputs})
        reference.close()
    if release:
        setattr(models, _network(name), None)
        gc.collect()
    engine = backend.load(engine_dir, manifest, (name,))[name]
    checks = []
    try:
        for feed, theirs in zip(feeds, expected):
            out = engine.infer({k: engine.xp.asarray(v) for k, v in feed.items()})
            # Every output (SDXL's text encoder: context and pooled); the component is judged by its worst one.
            metrics = max((compare(engine.to_host(out[t.name]), theirs[t.name]) for t in spec.outputs),
                          key=lambda m: m.rel_l2)
            shape = "x".join(map(str, feed[spec.inputs[0].name].shape))
            checks.append(judge(f"{name} {shape}", metrics, _precision(manifest, name, backend.name)))
    finally:
        engine.close()
    return checks


def _network(component: str) -> str:
    """The reference network behind an engine: both VAE engines run ``models.vae``."""
    return "vae" if component.startswith("vae") else component


class _in_fp32:
    """Run one reference network in fp32, converted in place; ``restore`` converts it back (fp16 -> fp32 -> fp16 is
    exact)."""

    def __init__(self, models, component: str, restore: bool = True):
        self.module = getattr(models, _network(component))
        self.dtype, self.restore = next(self.module.parameters()).dtype, restore

    def __enter__(self):
        import torch

        self.module.to(torch.float32)

    def __exit__(self, *exc):
        if self.restore:
            self.module.to(self.dtype)


def _end_to_end(engine_dir: Path, backend: str, models, manifest, steps: int) -> Check:
    """Same latents, scheduler and prompt through both loops; images compared in 0..1."""
    from rtsd.runtime import Runtime

    r = manifest.shape_range
    runtime = Runtime(engine_dir, backend=backend)
    reference = Runtime.from_reference(models, config=manifest.model)  # prediction type as exported
    try:
        size = min(max(r.opt_size, r.min_size), r.max_size)
        latents = np.random.default_rng(0).standard_normal((1, manifest.model.latent_channels, size // 8, size // 8),
                                                           dtype=np.float32)
        kwargs = dict(steps=steps, height=size, width=size, latents=latents, scheduler="euler", seed=0)
        if manifest.model.is_inpainting:
            kwargs.update(_inpainting_request(size))
        prompt = "a photo of an astronaut riding a horse"
        ours = np.asarray(runtime.generate(prompt, **kwargs).images[0], np.float64) / 255
        ref = np.asarray(reference.generate(prompt, **kwargs).images[0], np.float64) / 255
    finally:
        runtime.close()
    metrics = compare(ours, ref, peak=1.0)
    return Check(f"end-to-end {size}x{size} {steps} steps", metrics, f"PSNR > {MIN_IMAGE_PSNR_DB:.0f} dB",
                 metrics.psnr > MIN_IMAGE_PSNR_DB)


def _inpainting_request(size: int) -> dict:
    """A fixed picture (colour gradients) and a mask repainting its centre square, for inpainting engine dirs."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    image = np.stack([np.add.outer(ramp, ramp) / 2, np.outer(ramp, 1 - ramp), np.add.outer(1 - ramp, ramp) / 2], -1)
    mask = np.zeros((size, size), np.float32)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    return {"image": image, "mask_image": mask}


def _precision(manifest, name: str, backend: str) -> str:
    """Precision of the weights the backend runs for ``name``: the .plan's for TensorRT, else the ONNX file's."""
    record = manifest.engine_record(name, backend) if backend == "tensorrt" else None
    return (record or manifest.components[name]["onnx"])["precision"]
