"""The HTTP APIs clients already speak, translated to and from ``Runtime.generate`` (no serving engine imported here).

- OpenAI Images, ``POST /v1/images/generations``: prompt, model, n, size "WxH", response_format b64_json; rtsd's own
  options as extra body fields (steps, seed, negative_prompt, guidance_scale, scheduler, scheduler_options).
- AUTOMATIC1111 WebUI, ``POST /sdapi/v1/txt2img`` and ``/sdapi/v1/img2img``: A1111's field names, sampler names and
  seed rules (-1 = random; image i of a request uses seed + i), ``{images, parameters, info}`` with ``info`` a JSON
  string, as the WebUI returns.

A request becomes an ``ImageJob``: one prompt, one seed per image, and the settings that decide whether two jobs can
share a UNet call (``batch_key``). Everything is checked here, before any engine runs, so a bad request is a
``RequestError`` (HTTP 400) with one line naming the problem and the fix, and never fails a batch it would share.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rtsd import schedulers
from rtsd.errors import RtsdError

# A1111 sampler names -> (rtsd scheduler, options). The "Karras" variants are the same algorithm on Karras sigmas.
A1111_SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler": ("euler", {}),
    "Euler a": ("euler_a", {}),
    "LMS": ("lms", {}),
    "LMS Karras": ("lms", {"use_karras_sigmas": True}),
    "Heun": ("heun", {}),
    "DPM++ 2M": ("dpmpp_2m", {}),
    "DPM++ 2M Karras": ("dpmpp_2m", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", {}),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", {"use_karras_sigmas": True}),
    "DDIM": ("ddim", {}),
    "DDPM": ("ddpm", {}),
    "PLMS": ("pndm", {}),
    "UniPC": ("unipc", {}),
    "LCM": ("lcm", {}),
}
# A1111's newer separate "scheduler" field: only the sigma schedules rtsd has.
A1111_SCHEDULE_TYPES = {"automatic": {}, "karras": {"use_karras_sigmas": True}}  # matched case-insensitively
MAX_SEED = 2**32 - 1


class RequestError(RtsdError, ValueError):
    """A request the server refuses (HTTP 4xx): the message is one line naming the problem and the fix."""

    status = 400


@dataclass
class ImageJob:
    """One request, normalised: what ``Runtime.generate`` needs, with one seed per image."""

    prompt: str
    negative_prompt: str
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    scheduler_options: dict = field(default_factory=dict)
    image: np.ndarray | None = None  # (H, W, 3) uint8 init image (img2img / inpainting)
    mask: np.ndarray | None = None  # (H, W) uint8 inpainting mask
    strength: float | None = None
    received: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one generate call (one UNet batch). Init images are per call in
        ``Runtime.generate``, so an img2img job only batches its own images (its identity is in the key)."""
        return ("txt2img" if self.image is None else ("img2img", id(self)), self.width, self.height, self.steps,
                self.scheduler, json.dumps(self.scheduler_options, sort_keys=True), float(self.guidance_scale),
                self.strength)

    def generate_kwargs(self) -> dict[str, Any]:
        """Everything but the prompts and seeds, which a batch gathers from all of its jobs."""
        return dict(steps=self.steps, guidance_scale=self.guidance_scale, height=self.height, width=self.width,
                    scheduler=self.scheduler, scheduler_options=self.scheduler_options or None, image=self.image,
                    mask_image=self.mask, strength=self.strength)


@dataclass(frozen=True)
class EngineLimits:
    """What the loaded engines accept: checked per request so one bad request cannot fail a shared batch."""

    shape_range: Any  # rtsd.export.specs.ShapeRange
    inpainting: bool
    model_name: str

    @classmethod
    def of(cls, runtime, model_name: str) -> "EngineLimits":
        return cls(runtime.shape_range, runtime.config.is_inpainting, model_name)

    def check(self, job: ImageJob) -> ImageJob:
        try:
            self.shape_range.check(1, job.height, job.width)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if job.scheduler not in schedulers.available():
            raise RequestError(f"unknown scheduler {job.scheduler!r}; use one of {', '.join(schedulers.available())}")
        if not 1 <= job.steps <= 1000:
            raise RequestError(f"steps must be between 1 and 1000, got {job.steps}")
        if self.inpainting and (job.image is None or job.mask is None):
            raise RequestError("this server's engines inpaint (9-channel UNet): send an init image and a mask")
        if not self.inpainting and job.mask is not None:
            raise RequestError("a mask needs an inpainting engine directory; this server runs a text-to-image UNet: "
                               "drop the mask")
        for what, array in (("init image", job.image), ("mask", job.mask)):
            if array is not None and array.shape[:2] != (job.height, job.width):
                raise RequestError(f"{what} is {array.shape[1]}x{array.shape[0]} but the request asks for "
                                   f"{job.width}x{job.height}")
        if job.strength is not None and not 0.0 < job.strength <= 1.0:
            raise RequestError(f"denoising strength must be in (0, 1], got {job.strength}")
        try:  # options the scheduler does not have, or bad values: refuse now, not inside a batch
            schedulers.create(job.scheduler, num_inference_steps=job.steps, **job.scheduler_options)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"scheduler {job.scheduler!r}: {exc}") from None
        return job


# ----------------------------------------------------------------------------------------------------- OpenAI Images

def parse_openai(body: dict, limits: EngineLimits) -> ImageJob:
    body = _object(body)
    prompt = _get(body, "prompt", str, required=True)
    model = body.get("model")
    if model not in (None, "", limits.model_name):
        raise RequestError(f"model {model!r} is not served here; this server serves {limits.model_name!r}")
    response_format = body.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise RequestError(f"response_format {response_format!r} is not supported: rtsd returns images inline; "
                           f"use response_format='b64_json'")
    n = _get(body, "n", int, 1)
    if not 1 <= n <= 16:
        raise RequestError(f"n must be between 1 and 16, got {n}")
    opt = limits.shape_range.opt_size
    width, height = _size(body.get("size") or f"{opt}x{opt}")
    options = _get(body, "scheduler_options", dict, {})
    job = ImageJob(prompt=prompt, negative_prompt=_get(body, "negative_prompt", str, ""),
                   seeds=seeds_from(_get(body, "seed", int, -1), n), width=width, height=height,
                   steps=_get(body, "steps", int, 30), guidance_scale=_get(body, "guidance_scale", float, 7.5),
                   scheduler=_get(body, "scheduler", str, "dpmpp_2m"), scheduler_options=options)
    return limits.check(job)


def openai_response(job: ImageJob, images: list, info: dict) -> dict:
    """The official response shape (created, data[].b64_json, revised_prompt); rtsd's details under ``rtsd``."""
    return {"created": int(time.time()),
            "data": [{"b64_json": encode_png(im), "revised_prompt": job.prompt} for im in images],
            "rtsd": {"seeds": job.seeds, **info}}


# --------------------------------------------------------------------------------------------- AUTOMATIC1111 WebUI

def parse_a1111(body: dict, limits: EngineLimits, img2img: bool) -> ImageJob:
    body = _object(body)
    batch_size, n_iter = _get(body, "batch_size", int, 1), _get(body, "n_iter", int, 1)
    if batch_size < 1 or n_iter < 1 or batch_size * n_iter > 64:
        raise RequestError(f"batch_size x n_iter must be between 1 and 64 images, got {batch_size} x {n_iter}")
    scheduler, options = a1111_sampler(_get(body, "sampler_name", str, "Euler a") or "Euler a",
                                       _get(body, "scheduler", str, "Automatic") or "Automatic")
    width, height = _get(body, "width", int, 512), _get(body, "height", int, 512)
    image = mask = strength = None
    if img2img:
        init_images = body.get("init_images")
        if not isinstance(init_images, list) or len(init_images) != 1:
            raise RequestError("img2img needs init_images: a list of exactly one base64 image")
        if _get(body, "resize_mode", int, 0) != 0:
            raise RequestError("only resize_mode 0 (just resize) is supported")
        image = decode_image(init_images[0], "init_images[0]", "RGB", (width, height))
        if body.get("mask"):
            mask = decode_image(body["mask"], "mask", "L", (width, height))
        strength = _get(body, "denoising_strength", float, 0.75)
    job = ImageJob(prompt=_get(body, "prompt", str, ""), negative_prompt=_get(body, "negative_prompt", str, ""),
                   seeds=seeds_from(_get(body, "seed", int, -1), batch_size * n_iter), width=width, height=height,
                   steps=_get(body, "steps", int, 20), guidance_scale=_get(body, "cfg_scale", float, 7.0),
                   scheduler=scheduler, scheduler_options=options, image=image, mask=mask, strength=strength)
    return limits.check(job)


def a1111_sampler(name: str, schedule_type: str = "Automatic") -> tuple[str, dict]:
    if name in A1111_SAMPLERS:
        scheduler, options = A1111_SAMPLERS[name]
    elif name in schedulers.available():  # rtsd's own names are accepted too
        scheduler, options = name, {}
    else:
        raise RequestError(f"unknown sampler_name {name!r}; use one of {', '.join(A1111_SAMPLERS)} "
                           f"(GET /sdapi/v1/samplers lists them)")
    schedule = A1111_SCHEDULE_TYPES.get(schedule_type.lower())
    if schedule is None:
        raise RequestError(f"unknown scheduler {schedule_type!r}; use one of {', '.join(A1111_SCHEDULE_TYPES)}")
    options = {**options, **schedule}
    if "use_karras_sigmas" in options and "use_karras_sigmas" not in schedulers.options_of(scheduler):
        raise RequestError(f"sampler {name!r} has no Karras schedule in rtsd; use scheduler 'automatic'")
    return scheduler, options


def a1111_samplers() -> list[dict]:
    """``GET /sdapi/v1/samplers``: A1111's shape, only the samplers whose rtsd scheduler is present."""
    present = set(schedulers.available())
    return [{"name": name, "aliases": [scheduler], "options": {k: str(v) for k, v in options.items()}}
            for name, (scheduler, options) in A1111_SAMPLERS.items() if scheduler in present]


def a1111_response(job: ImageJob, body: dict, images: list, info: dict) -> dict:
    """``{images, parameters, info}``; ``info`` is a JSON string with A1111's keys (seed, all_seeds, ...)."""
    details = {"prompt": job.prompt, "all_prompts": [job.prompt] * job.n, "negative_prompt": job.negative_prompt,
               "all_negative_prompts": [job.negative_prompt] * job.n, "seed": job.seeds[0], "all_seeds": job.seeds,
               "subseed": -1, "all_subseeds": [-1] * job.n, "width": job.width, "height": job.height,
               "sampler_name": body.get("sampler_name") or "Euler a", "cfg_scale": job.guidance_scale,
               "steps": job.steps, "batch_size": _get(body, "batch_size", int, 1), "denoising_strength": job.strength,
               "index_of_first_image": 0, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
               "rtsd": {"scheduler": job.scheduler, "scheduler_options": job.scheduler_options, **info}}
    parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    return {"images": [encode_png(im) for im in images], "parameters": parameters, "info": json.dumps(details)}


# ---------------------------------------------------------------------------------------------------- shared pieces

def encode_png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data, what: str, mode: str, size: tuple[int, int]) -> np.ndarray:
    """Base64 (with or without a ``data:image/...;base64,`` prefix) -> uint8 array of ``mode`` at ``size`` (A1111's
    resize_mode 0 resizes init images to the request's size)."""
    from PIL import Image

    if not isinstance(data, str):
        raise RequestError(f"{what} must be a base64 string")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{what} is not valid base64: {exc}") from None
    except OSError as exc:
        raise RequestError(f"{what} is not a readable image (PNG, JPEG, WebP): {exc}") from None
    image = image.convert(mode)
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
    return np.asarray(image)


def seeds_from(seed: int, n: int) -> list[int]:
    if seed == -1:
        seed = secrets.randbelow(MAX_SEED - n)
    if not 0 <= seed <= MAX_SEED:
        raise RequestError(f"seed must be -1 (random) or in 0..{MAX_SEED}, got {seed}")
    return [seed + i for i in range(n)]


def _size(size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise RequestError(f"size must be 'WIDTHxHEIGHT', e.g. '512x512', got {size!r}") from None
    return width, height


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


_TYPES = {int: "an integer", float: "a number", str: "a string", dict: "an object"}


def _get(body: dict, key: str, kind: type, default: Any = None, required: bool = False):
    value = body.get(key)
    if value is None:
        if required:
            raise RequestError(f"{key!r} is required")
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RequestError(f"{key!r} must be {_TYPES[kind]}, got {json.dumps(value)[:40]}")
    return value
