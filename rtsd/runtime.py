"""``Runtime(engine_dir).generate(prompt)``: prompts in, PIL images out, through the engines of an engine directory.

Torch-free: this module imports NumPy, Pillow, the tokenizer, the NumPy schedulers and one backend. The loop is
written against the engines' array module (``xp``: NumPy for ONNX Runtime, CuPy for TensorRT), so with TensorRT the
latents stay on the device for the whole generation and the CFG combine and scheduler arithmetic run there; the
host only computes scalars and copies token ids and noise in, the image out.

Seeds: the initial noise is ``numpy.random.default_rng(seed).standard_normal((N, 4, H/8, W/8), dtype=float32)``
(PCG64), and stochastic samplers draw their per-step noise from the same generator afterwards, in step order. The
same seed gives the same images on every machine and backend up to the engines' arithmetic. It does not reproduce
diffusers' torch.randn noise; pass ``latents=`` to use noise from elsewhere.

Inpainting (engine dirs whose UNet takes 9 channels) follows diffusers' StableDiffusionInpaintPipeline: the mask is
binarised at 0.5 (white = repaint, black = keep), the masked image (repainted area set to mid-grey) is encoded once,
and every UNet call gets [latents, mask at latent size, masked-image latents] concatenated on the device.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rtsd import added_conditions, handoff, schedulers
from rtsd.control import ControlResiduals, check_controls
from rtsd.engine import get_backend
from rtsd.engine.base import Backend
from rtsd.engine.fused_step import device_step
from rtsd.engine.verify import verify_engine_dir
from rtsd.errors import NonFiniteOutputError, RtsdError
from rtsd.export.manifest import Manifest
from rtsd.export.specs import COMPONENTS, ShapeRange
from rtsd.images import inpainting_mask, init_image_pixels, latent_mask, to_pil
from rtsd.noise import SeededNoise
from rtsd.text_conditioning import TextConditioning
from rtsd.tokenizer import Tokenizer
from rtsd.validation import check_request

StepCallback = Callable[[int, int, float, Any], None]  # (step index, total steps, timestep, latents) after each step


@dataclass
class GenerationResult:
    images: list  # PIL.Image.Image, one per generated image
    seed: int
    timings: dict[str, float]  # seconds per stage, and per UNet step
    parameters: dict[str, Any] = field(default_factory=dict)  # what produced the images (stored in PNG text chunks)
    latents: np.ndarray | None = None  # output_type="latent": the final latents (N, 4, H/8, W/8), no images


class Runtime:
    """Loads an engine directory once; ``generate`` can then be called any number of times."""

    def __init__(self, engine_dir: str | Path, backend: "str | Backend | None" = None, verify: bool = True):
        """backend: None (TensorRT if the directory has plans and TensorRT runs here, else ONNX Runtime), a name
        ("tensorrt", "onnxruntime"), or a configured backend object, e.g.
        ``OnnxRuntimeBackend(providers=["CPUExecutionProvider"], threads=4)``. verify: check the files' sha256
        against the manifest (once per file; remembered afterwards, see rtsd.engine.verify)."""
        self.engine_dir = Path(engine_dir)
        manifest, chosen = open_engine_dir(self.engine_dir, backend, verify)
        self.manifest = manifest
        self.verified = verify  # unverified files can also be why outputs are non-finite
        tokenizer = Tokenizer.load(self.engine_dir / manifest.tokenizer["directory"])
        controlnets = tuple(c for c, record in manifest.components.items() if "controlnet" in record)
        self._setup(manifest.model, manifest.shape_range, tokenizer, chosen.name,
                    chosen.load(self.engine_dir, manifest, COMPONENTS + controlnets), manifest.source.get("sha256"))

    @classmethod
    def from_reference(cls, models, shape_range: ShapeRange | None = None, config=None) -> "Runtime":
        """The same loop on the PyTorch reference models (needs torch): the parity oracle and benchmark baseline.

        ``models`` comes from ``rtsd.models.load_checkpoint``; it runs on the models' device and dtype. ``config``
        (e.g. an engine dir's ``manifest.model``) overrides what weights cannot tell, such as the prediction type.
        """
        from rtsd.engine.torch import TorchBackend

        runtime = cls.__new__(cls)
        runtime.engine_dir = runtime.manifest = None
        range_ = shape_range or ShapeRange(min_size=64, max_size=2048, opt_size=512, max_batch=16)
        runtime._setup(config or models.config, range_, models.tokenizer, "torch", TorchBackend(models, range_).load(),
                       None)
        return runtime

    def _setup(self, config, shape_range, tokenizer, backend_name, engines, source_sha256) -> None:
        self.config, self.shape_range, self.tokenizer = config, shape_range, tokenizer
        self.backend_name, self.engines, self.source_sha256 = backend_name, engines, source_sha256
        self.xp = engines["unet"].xp
        self.text = TextConditioning(tokenizer, engines["text_encoder"].spec, config, shape_range)
        self._loras = None  # engine/weights.LoraSwitcher, created on the first LoRA request

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Make a textual-inversion file (A1111 .pt, .safetensors, diffusers learned_embeds) callable in prompts as
        ``token`` (default: the file's stem, as A1111 does); returns the token. No re-export: the vectors reach the
        text encoder as extra rows."""
        return self.text.load_embedding(path, token).token

    def load_textual_inversions(self, directory: str | Path) -> list[str]:
        """Every embedding file in ``directory`` (A1111's embeddings folder), each called by its stem."""
        return [e.token for e in self.text.load_embeddings_dir(directory)]

    def set_loras(self, loras: "dict[str | Path, float]") -> None:
        """Run with these LoRAs ({path: scale}) from now on, switched in the loaded engines (ONNX Runtime sessions
        rebuilt from memory, TensorRT plans refitted); no re-export, no rebuild. ``{}`` returns to the base weights."""
        if self._loras is None:
            if self.manifest is None:
                raise RtsdError("LoRAs need an engine directory; merge them into the reference models instead")
            from rtsd.engine.weights import LoraSwitcher

            self._loras = LoraSwitcher(self.engine_dir, self.manifest, self.backend_name)
        self._loras.switch(self.engines, loras)

    def _lora_records(self) -> list[dict]:
        baked = [{**r, "sha256": r["sha256"][:12], "baked": True} for r in (self.manifest.loras if self.manifest else [])]
        return baked + (self._loras.records if self._loras else [])

    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 steps: int = 30, guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                 seed: int | None = None, seeds: Sequence[int] | None = None, scheduler: str = "dpmpp_2m",
                 scheduler_options: dict | None = None,
                 num_images: int = 1, latents: np.ndarray | None = None, image=None, mask_image=None,
                 strength: float | None = None, callback: StepCallback | None = None,
                 prompt_syntax: str = "a1111", loras: "dict[str | Path, float] | None" = None,
                 size_conditions: "added_conditions.SizeConditions | dict | None" = None,
                 denoising_start: float | None = None, denoising_end: float | None = None,
                 output_type: str = "pil", controlnets: Sequence | None = None,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, guess_mode: bool = False) -> GenerationResult:
        """prompt_syntax: "a1111" (``(word:1.2)``, ``[word]``, BREAK; prompts past 75 tokens in chunks; rtsd.prompt)
        or "plain" (the text as is, still chunked).
        seeds: one seed per image instead of ``seed`` (rtsd.noise): image i then equals a one-image generation
        with ``seed=seeds[i]``, whatever else shares the call (what lets a server batch requests).
        image: init image (PIL, path, or (H, W, 3) uint8 / [0, 1] float array) for img2img, or the picture to
        inpaint; mask_image: inpainting engine dirs only, same size, white = repaint, black = keep (PIL "L"/"1"/"RGB",
        path, or (H, W) array). strength: how much to repaint, default 0.8 for img2img and 1.0 for inpainting
        (1.0 starts from pure noise; less starts from the noised encoded image). loras: {path: scale}, switched in
        only when it differs from the current set (see set_loras); None keeps the current set.
        height/width: default the model's size (512 for SD 1.x/2.x, 1024 for SDXL).
        size_conditions (SDXL): original_size, target_size, crops_coords_top_left, aesthetic_score (refiner) and
        their negative_* forms, as diffusers' SDXL pipelines take them (rtsd.added_conditions.SizeConditions or a dict).
        denoising_end / denoising_start (SDXL base + refiner hand-off, rtsd.handoff): stop the schedule early / start
        it late from ``latents`` as given. output_type: "pil" (images) or "latent" (``result.latents``, no decode).
        controlnets: [(name, control image, scale), ...] (scale optional, default 1.0) of this directory's ControlNets
        (``rtsd export --controlnet``); control_guidance_start/end: the part of the steps each one acts on (one value,
        or one per ControlNet); guess_mode: control on the conditional rows only, with diffusers' log-spaced scales
        (rtsd.control)."""
        timings: dict[str, float] = {}
        start = time.perf_counter()

        # 1. Check the whole request before any engine runs.
        height, width = height or self.config.default_size, width or self.config.default_size
        conditions = _size_conditions(size_conditions)
        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        checked = check_request(prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                                guidance_scale=guidance_scale, height=height, width=width, seed=seed,
                                num_images=num_images, strength=strength, image=image, scheduler=scheduler,
                                scheduler_options=scheduler_options)
        seed, guidance_scale = checked["seed"], checked["guidance_scale"]
        prompts, negatives = _prompt_lists(prompt, negative_prompt, num_images)
        n = len(prompts)
        self.shape_range.check(n, height, width)
        inpaint = _check_mode(self.config.is_inpainting, image, mask_image)
        if strength is None:
            strength = 1.0 if inpaint else 0.8
        sampler = self._scheduler(scheduler, steps, scheduler_options)
        latent_shape = (n, self.config.latent_channels, height // 8, width // 8)
        initial = _check_latents(latents, latent_shape) if latents is not None else None
        # Inpainting encodes its one image once (1 row) and repeats the latents on the device for every image.
        init_pixels = init_image_pixels(image, height, width, 1 if inpaint else n) if image is not None else None
        mask = inpainting_mask(mask_image, height, width) if inpaint else None
        controls = self._controls(controlnets, height, width, control_guidance_start, control_guidance_end)
        start_index = _img2img_start(sampler, steps, strength) if image is not None else 0
        train_steps = self.config.scheduler.num_train_timesteps
        end_index = handoff.end_index(sampler, denoising_end, train_steps)
        if denoising_start is not None:  # the refiner continues the base's latents: no noise, no encode
            if latents is None or image is not None:
                raise ValueError("denoising_start continues from latents: pass latents= (the base's "
                                 "output_type='latent' result) and no image=")
            start_index = handoff.start_index(sampler, denoising_start, train_steps)
        rng = SeededNoise(seed, seeds, n)
        seed = rng.seed
        use_cfg = guidance_scale > 1.0
        xp = self.xp
        t0 = time.perf_counter()
        text = self.text.prepare(negatives + prompts if use_cfg else prompts, prompt_syntax)  # syntax, chunks, limit
        timings["tokenize"] = time.perf_counter() - t0
        if loras is not None:
            self.set_loras(loras)  # after every request check (the prompt's too): a bad request changes no weights

        # 2. Encode prompts: unconditional rows first, then conditional, one text-encoder call per 77-token chunk.
        t0 = time.perf_counter()
        context, pooled = self.text.encode_with_pooled(self.engines["text_encoder"], text)
        context, added = added_conditions.condition(self.config, xp, context, pooled, n, use_cfg,
                                                    negative_prompt is not None, conditions, height, width)
        self._sync()
        timings["text_encoder"] = time.perf_counter() - t0

        # 3. Initial latents: seeded noise (or the caller's), or for img2img the encoded image noised to the start step;
        #    inpainting at strength 1 starts from pure noise, as diffusers does. Inpainting also encodes the masked image:
        #    mask + masked-image latents are the UNet's 5 extra channels, on the device, one row per UNet batch row.
        noise = initial if initial is not None else rng.draw(latent_shape)
        t0 = time.perf_counter()
        if denoising_start is not None:
            x = xp.asarray(noise)
        elif init_pixels is None or (inpaint and strength == 1.0):
            x = xp.asarray(noise) * sampler.init_noise_sigma
        else:
            encoded = self._encode(init_pixels)
            if inpaint:
                encoded = xp.concatenate([encoded] * n)
            x = sampler.add_noise(encoded, xp.asarray(noise), start_index)
        extra_channels = None
        if inpaint:
            # diffusers zeroes the repainted area of the [-1, 1] image: mid-grey 0.5 in the encoder's [0, 1] input.
            masked_pixels = init_pixels * (1.0 - mask) + np.float32(0.5) * mask
            extra = xp.concatenate([xp.asarray(latent_mask(mask)), self._encode(masked_pixels)], axis=1)
            extra_channels = xp.concatenate([extra] * (2 * n if use_cfg else n))
        if init_pixels is not None:
            self._sync()
            timings["vae_encode"] = time.perf_counter() - t0

        # 4. Denoise: one UNet call per scheduler timestep, CFG combine and step on the engines' array module.
        t0 = time.perf_counter()
        total = end_index
        unet, scheduler_time = self.engines["unet"], 0.0
        step = device_step(sampler, xp)  # CFG combine + step: one fused kernel on CuPy
        residuals = ControlResiduals(self.engines, self.config.unet, controls, images=n, cfg=use_cfg,
                                     guess_mode=guess_mode, height=height, width=width)
        for i in range(start_index, total):
            t = float(sampler.timesteps[i])
            model_in = sampler.scale_model_input(x, i)
            if use_cfg:
                model_in = xp.concatenate([model_in, model_in])
            control = residuals(i - start_index, total - start_index, model_in, t, context)  # zeros without ControlNet
            if extra_channels is not None:
                model_in = xp.concatenate([model_in, extra_channels], axis=1)
            rows = model_in.shape[0]
            out = unet.infer({"sample": model_in, "timestep": xp.full((rows,), t, dtype=xp.float32),
                              "encoder_hidden_states": context, **added, **control})["model_output"]
            s0 = time.perf_counter()
            uncond, cond = (out[:n], out[n:]) if use_cfg else (out, None)
            step_noise = xp.asarray(rng.draw(latent_shape)) if sampler.stochastic else None
            x = step(uncond, cond, guidance_scale, i, x, step_noise)
            scheduler_time += time.perf_counter() - s0
            if callback is not None:
                callback(i - start_index, total - start_index, t, x)
        self._sync()
        timings["denoise"] = time.perf_counter() - t0
        timings["unet_per_step"] = timings["denoise"] / max(total - start_index, 1)
        timings["scheduler_host"] = scheduler_time

        # 5. Decode to [0, 1] images and bring them to the host: the only device-to-host copy.
        if output_type == "latent":
            timings["total"] = time.perf_counter() - start
            return GenerationResult(images=[], seed=seed, timings=timings, latents=self.engines["unet"].to_host(x),
                                    parameters={"steps": steps, "denoising_end": denoising_end, "seed": seed})
        t0 = time.perf_counter()
        pixels = self.engines["vae_decoder"].infer({"latent": x})["images"]
        pixels = self.engines["vae_decoder"].to_host(pixels)
        timings["vae_decode"] = time.perf_counter() - t0
        if not np.isfinite(pixels).all():
            unverified = "" if getattr(self, "verified", True) else (
                " or damaged engine files (loaded with --no-verify: load once without it to check their hashes)")
            raise NonFiniteOutputError(f"the VAE decoder produced non-finite values (fp16 overflow?{unverified}); "
                                       "re-export with an fp32 VAE (`rtsd export --fp32-vae`) instead of writing a "
                                       "black image")
        images = to_pil(pixels)
        timings["total"] = time.perf_counter() - start
        parameters = {"prompt": prompts[0] if n == 1 else prompts, "negative_prompt": negatives[0] if n == 1 else negatives,
                      "steps": steps, "guidance_scale": guidance_scale, "height": height, "width": width,
                      "seed": seed, **({"seeds": rng.seeds} if seeds is not None else {}),
                      "scheduler": scheduler, "prompt_syntax": prompt_syntax,
                      "embeddings": text.describe_embeddings(), "scheduler_options": scheduler_options or {},
                      "strength": strength if image is not None else None, "inpainting": inpaint,
                      "backend": self.backend_name,
                      "model": self.config.family, "checkpoint_sha256": self.source_sha256,
                      "loras": self._lora_records(),
                      "controlnets": [{"name": c.component.split(".", 1)[1], "scale": c.scale, "start": c.start,
                                       "end": c.end} for c in controls], "guess_mode": guess_mode if controls else None}
        return GenerationResult(images=images, seed=seed, timings=timings, parameters=parameters)

    def _controls(self, controlnets, height: int, width: int, start, end):
        """The request's ControlNets checked against this directory (names, images, scales, windows)."""
        from rtsd.export.manifest import CONTROLNET_FORMAT

        available = [name.split(".", 1)[1] for name in self.engines if name.startswith("controlnet.")]
        version = self.manifest.format_version if self.manifest is not None else CONTROLNET_FORMAT
        return check_controls(controlnets, available, height, width, start, end, version >= CONTROLNET_FORMAT,
                              f"{self.engine_dir} was exported before ControlNet support (format {version}): its UNet "
                              f"takes no ControlNet residuals; re-export it with this rtsd (`rtsd export --checkpoint "
                              f"CKPT --output DIR --controlnet NAME=PATH`)")

    def _encode(self, pixels: np.ndarray):
        """[0, 1] host pixels -> scaled latents (posterior mean) on the engines' array module."""
        return self.engines["vae_encoder"].infer({"images": self.xp.asarray(pixels)})["latent"]

    def _scheduler(self, name: str, steps: int, options: dict | None):
        """A fresh scheduler for one generation, on the checkpoint's training schedule; options override."""
        train = dataclasses.asdict(self.config.scheduler)
        return schedulers.create(name, num_inference_steps=steps, **{**train, **(options or {})})

    def _sync(self) -> None:
        self.engines["unet"].synchronize()  # all engines of a backend share one stream

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def _size_conditions(value) -> "added_conditions.SizeConditions":
    if value is None:
        return added_conditions.SizeConditions()
    if isinstance(value, added_conditions.SizeConditions):
        return value
    if isinstance(value, dict):
        try:
            return added_conditions.SizeConditions(**value)
        except TypeError:
            names = [f.name for f in dataclasses.fields(added_conditions.SizeConditions)]
            raise ValueError(f"size_conditions takes {', '.join(names)}; got {sorted(value)}") from None
    raise TypeError(f"size_conditions must be a dict or SizeConditions, got {type(value).__name__}")


def open_engine_dir(engine_dir: Path, backend: "str | Backend | None" = None,
                    verify: bool = True) -> tuple[Manifest, Backend]:
    """Read the manifest, choose the backend (as ``Runtime`` documents) and check the files it will load; loads no
    engine (``Runtime`` loads them all, the parity check one at a time)."""
    manifest = Manifest.read(engine_dir)
    if isinstance(backend, Backend):
        chosen = backend
    else:
        chosen = get_backend(backend) if backend else _default_backend(manifest)
    manifest.check_files(engine_dir, backend=chosen.name)
    verify_engine_dir(engine_dir, manifest, chosen.name, hashes=verify)
    return manifest, chosen


def _default_backend(manifest: Manifest) -> Backend:
    """TensorRT when the directory has plans for every component (ControlNets included) and TensorRT runs here;
    else ONNX Runtime."""
    if all(manifest.engine_record(c, "tensorrt") for c in manifest.components):  # ControlNets too
        try:
            return get_backend("tensorrt")
        except RtsdError:  # TensorRT, CuPy or a GPU missing here: the ONNX files still run
            pass
    return get_backend("onnxruntime")


def _prompt_lists(prompt, negative_prompt, num_images: int) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompt must be a string or a non-empty list of strings")
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    else:
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
            raise ValueError(f"negative_prompt must be a string or a list of {len(prompts)} strings, one per prompt")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    return ([p for p in prompts for _ in range(num_images)], [p for p in negatives for _ in range(num_images)])


def _check_latents(latents, shape: tuple[int, ...]) -> np.ndarray:
    latents = np.asarray(latents)
    if latents.shape != shape:
        raise ValueError(f"latents must have shape {shape} (images, channels, height/8, width/8), got {latents.shape}")
    if not np.isfinite(latents).all():
        raise ValueError("latents contain NaN or infinity")
    return latents.astype(np.float32, copy=False)


def _check_mode(inpainting_unet: bool, image, mask_image) -> bool:
    """True for an inpainting request; refuse a mask the UNet cannot take, or an inpainting UNet without one."""
    if inpainting_unet and (image is None or mask_image is None):
        raise ValueError("this engine directory holds an inpainting UNet (9 input channels): pass both an image and a "
                         "mask (image=..., mask_image=...; CLI: --image and --mask), white = repaint, black = keep")
    if not inpainting_unet and mask_image is not None:
        raise ValueError("a mask needs an inpainting engine directory (9-channel UNet, e.g. exported from "
                         "sd-v1-5-inpainting); this one holds a text-to-image UNet: drop the mask, or use --image "
                         "alone for img2img")
    return inpainting_unet


def _img2img_start(sampler, steps: int, strength: float) -> int:
    """First scheduler index for img2img, as diffusers' img2img pipeline: skip (1 - strength) of the steps."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    init_steps = min(int(steps * strength), steps)
    if init_steps < 1:
        raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step; raise strength or steps")
    return (steps - init_steps) * sampler.order
