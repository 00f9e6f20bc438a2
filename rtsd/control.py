"""ControlNet residuals for the generation loop: request checks, control images, and one call per step.

Follows diffusers' StableDiffusionControlNetPipeline (and its img2img sibling):

* control image: RGB, resized to the output size (Lanczos, as diffusers' VaeImageProcessor), [0, 1], one row per
  image and duplicated for classifier-free guidance (unconditional rows first);
* step i of N runs ControlNet k only while ``start_k <= i / N`` and ``(i + 1) / N <= end_k``; outside that window its
  scale is 0, so its residuals are zeros and its engine is not run;
* guess mode with CFG: only the conditional rows go through the ControlNets (latents, text context and control
  image of those rows), the unconditional rows get zero residuals, and residual j of J is scaled by
  10 ** (-1 + j / (J - 1)) times the ControlNet's scale;
* several ControlNets: their residuals are summed (diffusers' MultiControlNetModel).

Scaling happens inside each ControlNet engine (its ``conditioning_scale`` input: one value per residual); the sum,
the zero rows and the zeros of the plain path are made on the engines' array module (``xp``), so with TensorRT the
residuals never leave the device. Host-side work is only the control images, once per generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rtsd.control_layout import guess_mode_scales

COMPONENT_PREFIX = "controlnet."  # the manifest's ControlNet components (export/controlnet.py)


@dataclass(frozen=True)
class Control:
    component: str
    pixels: np.ndarray  # (1, 3, H, W) float32 in [0, 1]
    scale: float
    start: float
    end: float


def control_image_pixels(image, height: int, width: int) -> np.ndarray:
    """A control image (PIL image, path, or (H, W, 3) uint8 / [0, 1] float array) -> (1, 3, H, W) float32 in
    [0, 1] at the output size, resized with Lanczos when its size differs (as diffusers' VaeImageProcessor)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read control image {image}: {exc}") from None
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a control image array must be (height, width, 3) RGB, got shape {image.shape}")
        from rtsd.images import _unit_range

        pixels = _unit_range(image, "control image")
        if pixels.shape[:2] != (height, width):
            image = Image.fromarray((pixels * 255).round().astype(np.uint8))
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    elif not isinstance(image, np.ndarray):
        raise TypeError(f"a control image must be a PIL image, a path or a NumPy array, got {type(image).__name__}")
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def check_controls(controlnets, available: Sequence[str], height: int, width: int, start, end,
                   supported: bool, reexport: str) -> list[Control]:
    """The request's ControlNets, checked: known names, images, scales and guidance windows (one per ControlNet or
    one for all). Raises before any engine runs."""
    if not controlnets:
        return []
    if not supported:
        raise ValueError(reexport)
    if isinstance(controlnets, tuple) and len(controlnets) in (2, 3) and isinstance(controlnets[0], str):
        controlnets = [controlnets]  # one ("name", image[, scale]) given without the list
    entries = list(controlnets)
    starts, ends = _per_controlnet(start, len(entries), "control_guidance_start"), _per_controlnet(
        end, len(entries), "control_guidance_end")
    checked = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise ValueError(f"controlnets[{index}] must be (name, image) or (name, image, scale), got "
                             f"{type(entry).__name__} of length {len(entry) if isinstance(entry, (tuple, list)) else '-'}")
        name, image, scale = (*entry, 1.0) if len(entry) == 2 else entry
        if name not in available:
            raise ValueError(f"unknown ControlNet {name!r}; this engine directory has "
                             f"{', '.join(sorted(available)) or 'none'} (add one with `rtsd export --add-controlnet "
                             f"ENGINE_DIR {name}=PATH`)")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
            raise ValueError(f"ControlNet {name!r}: the conditioning scale must be a finite number, got {scale!r}")
        if not 0.0 <= starts[index] < ends[index] <= 1.0:
            raise ValueError(f"ControlNet {name!r}: control guidance must satisfy 0 <= start < end <= 1, got "
                             f"start {starts[index]}, end {ends[index]}")
        checked.append(Control(COMPONENT_PREFIX + name, control_image_pixels(image, height, width), float(scale),
                               float(starts[index]), float(ends[index])))
    return checked


def _per_controlnet(value, count: int, what: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{what} has {len(values)} values for {count} ControlNet(s); give one per ControlNet or "
                         "a single number")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what} must be numbers in [0, 1], got {value!r}")
    return [float(v) for v in values]


class ControlResiduals:
    """The UNet's residual feeds at each step: the sum of the active ControlNets' outputs, or zeros."""

    def __init__(self, engines: dict[str, Any], unet_config, controls: list[Control], *, images: int, cfg: bool,
                 guess_mode: bool, height: int, width: int):
        from rtsd.control_layout import residual_names

        self.engines, self.controls, self.n, self.cfg = engines, controls, images, cfg
        unet_spec = engines["unet"].spec
        unet_inputs = {t.name for t in unet_spec.inputs}
        self.names = [name for name in residual_names(unet_config) if name in unet_inputs]
        self.xp = engines["unet"].xp
        rows = 2 * images if cfg else images
        shapes = unet_spec.shapes(rows, height, width)
        self.shapes = {name: shapes[name] for name in self.names}
        self._zeros: dict[str, Any] | None = None
        self.cond_only = guess_mode and cfg  # guess mode: control on the conditional rows only
        xp = self.xp
        control_rows = images if self.cond_only else rows
        self.images = {c.component: xp.asarray(np.ascontiguousarray(np.broadcast_to(
            c.pixels, (control_rows, *c.pixels.shape[1:])))) for c in controls}
        count = len(self.names)
        self.scales = {c.component: np.asarray(guess_mode_scales(count, 1.0) if guess_mode else [1.0] * count,
                                               np.float32) for c in controls}

    def zeros(self) -> dict[str, Any]:
        if self._zeros is None:  # made once per generation, on the device with TensorRT
            self._zeros = {name: self.xp.full(shape, 0.0, dtype=self.xp.float32) for name, shape in self.shapes.items()}
        return self._zeros

    def __call__(self, step: int, steps: int, model_in, t: float, context) -> dict[str, Any]:
        """Residual feeds for loop position ``step`` of ``steps`` (model_in: the CFG-batched latents, before any
        inpainting channels)."""
        if not self.names:
            return {}  # an engine directory from before ControlNet: its UNet takes no residuals
        total = None
        for control in self.controls:
            if step / steps < control.start or (step + 1) / steps > control.end:
                continue  # diffusers runs it with scale 0: zeros, the same as not running it
            total = self._add(total, self._run(control, model_in, t, context))
        return self.zeros() if total is None else total

    def _run(self, control: Control, model_in, t: float, context) -> dict[str, Any]:
        xp, n = self.xp, self.n
        sample, text = (model_in[n:], context[n:]) if self.cond_only else (model_in, context)
        rows = sample.shape[0]
        out = self.engines[control.component].infer({
            "sample": sample, "timestep": xp.full((rows,), t, dtype=xp.float32), "encoder_hidden_states": text,
            "control_image": self.images[control.component],
            "conditioning_scale": xp.asarray(self.scales[control.component] * np.float32(control.scale))})
        if self.cond_only:  # unconditional rows first, as the UNet batch is laid out
            zeros = self.zeros()
            return {name: xp.concatenate([zeros[name][:n], out[name]]) for name in self.names}
        return {name: out[name] for name in self.names}

    @staticmethod
    def _add(total, residuals):
        if total is None:
            return residuals
        return {name: total[name] + residuals[name] for name in total}
