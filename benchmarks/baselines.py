"""The contenders of benchmarks/latency.py behind one interface, all on the same weights.

- rtsd engines (ONNX Runtime CPU/CUDA, TensorRT) through ``rtsd.Runtime``.
- PyTorch reference: rtsd's own reference networks (rtsd.models) driven by the very same generation loop as the
  engines (``Runtime.from_reference``): the cost of eager PyTorch without any runtime change.
- diffusers: a ``StableDiffusionPipeline`` built from the same single-file checkpoint through diffusers' own LDM
  converters (no network, no rtsd model code), with the same scheduler algorithm, steps, size, guidance and initial
  noise: what a user would run otherwise.

Both baselines run in float32 on the CPU and float16 on CUDA, with PyTorch's scaled-dot-product attention (SDPA),
the best ordinary setting of each. On the CPU their weights are copied into private memory after loading (see
``private_copy``). The diffusers pipeline is the one the tests use as their oracle (tests/diffusers_oracle.py: built
on the meta device and loaded by assignment, one copy of the weights).

Interface of a contender: ``config``, ``settings(threads)``, ``stage_calls(prompts, unet_feeds, vae_feeds)`` -> one
synchronous callable per stage, ``generate(...)`` -> (uint8 images, timings), ``close()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The diffusers counterpart of rtsd options, shared with the scheduler-step benchmark: same algorithm, both sides.
from scheduler_step import DIFFUSERS_CONFIG, RTSD_OPTIONS

from rtsd.config import ModelConfig
from rtsd.schedulers import scheduler_class


def torch_device_dtype(device: str):
    """float32 on the CPU, float16 on CUDA: each device's ordinary inference dtype."""
    import torch

    return torch.float16 if device == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------- PyTorch reference

def private_copy(module) -> None:
    """Give every parameter and buffer its own memory, instead of a view into the checkpoint's mmap.

    Loaders map the .safetensors file and hand out views into it (rtsd.models.load_checkpoint, safetensors'
    load_file). File-backed pages can be dropped by the OS and faulted back in at any later call; on the benchmark
    VM (proactive reclaim) that made eager UNet calls 3.7x slower and bimodal (14 s vs 3.8 s at 256x256). ONNX Runtime
    and TensorRT copy weights into their own memory, so this puts the baselines on the same footing.
    """
    import torch

    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone()


WEIGHTS_NOTE = "private copy in RAM (not views into the checkpoint's mmap)"


def reference_runtime(checkpoint: str | Path, device: str):
    """``Runtime.from_reference`` on rtsd's PyTorch reference models, fp32 on the CPU or fp16 on CUDA."""
    from rtsd.models import load_checkpoint
    from rtsd.runtime import Runtime

    models = load_checkpoint(checkpoint, dtype=torch_device_dtype(device), device=device)
    if device == "cpu":
        for module in models.components().values():
            private_copy(module)
    return Runtime.from_reference(models)


def reference_settings(device: str, threads: int | None) -> dict[str, Any]:
    import torch

    return {"implementation": "rtsd.models (PyTorch eager) in the rtsd generation loop", "device": device,
            "dtype": str(torch_device_dtype(device)).removeprefix("torch."),
            "attention": "torch.nn.functional.scaled_dot_product_attention", "torch": torch.__version__,
            "weights": WEIGHTS_NOTE if device == "cpu" else None, "threads": threads if device == "cpu" else None}


# ---------------------------------------------------------------------------------------------- diffusers

def diffusers_scheduler(name: str, config: ModelConfig):
    """The diffusers class of rtsd scheduler ``name``, on the checkpoint's training schedule, with the options that
    make it the same algorithm as rtsd's defaults (as in benchmarks/scheduler_step.py)."""
    import diffusers

    s = config.scheduler
    cls = getattr(diffusers, scheduler_class(name).diffusers_class)
    return cls(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
               beta_schedule=s.beta_schedule, prediction_type=s.prediction_type, timestep_spacing=s.timestep_spacing,
               steps_offset=s.steps_offset, **DIFFUSERS_CONFIG.get(name, {}))


def rtsd_scheduler_options(name: str) -> dict:
    return dict(RTSD_OPTIONS.get(name, {}))


class DiffusersContender:
    """A diffusers StableDiffusionPipeline on the checkpoint's weights, measured stage by stage and end to end."""

    label = "diffusers"

    def __init__(self, checkpoint: str | Path, tokenizer_dir: Path, scheduler: str, device: str):
        import diffusers

        from rtsd.checkpoint import detect_config, open_checkpoint
        from tests.diffusers_oracle import diffusers_pipeline, sdxl_pipeline

        diffusers.utils.logging.set_verbosity_error()
        config = detect_config(open_checkpoint(checkpoint).shapes)
        self.config, self.device, self.dtype = config, device, torch_device_dtype(device)
        self.sdxl = config.family == "sdxl"
        if config.family not in ("sd1", "sd2", "sdxl"):
            raise SystemExit(f"error: the diffusers baseline runs SD 1.x/2.x and SDXL base, not {config.family}")
        if self.sdxl:  # StableDiffusionXLPipeline from the published SDXL base configs
            self.pipe = sdxl_pipeline(checkpoint, "sdxl", tokenizer_dir, diffusers_scheduler(scheduler, config),
                                      dtype=self.dtype, device=device)
        else:
            family = {"sd1": "sd15", "sd2": "sd21"}[config.family]  # the published configs the oracle builds from
            self.pipe = diffusers_pipeline(checkpoint, family, tokenizer_dir, diffusers_scheduler(scheduler, config),
                                           dtype=self.dtype, device=device)
        if device == "cpu":
            for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder,
                           getattr(self.pipe, "text_encoder_2", None)):
                if module is not None:
                    private_copy(module)
        self.pipe.set_progress_bar_config(disable=True)
        self._step_seconds = 0.0
        original_step = self.pipe.scheduler.step

        def timed_step(*args, **kwargs):  # measures, changes nothing: the pipeline calls scheduler.step each step
            start = time.perf_counter()
            out = original_step(*args, **kwargs)
            self._step_seconds += time.perf_counter() - start
            return out

        self.pipe.scheduler.step = timed_step

    def settings(self, threads: int | None) -> dict[str, Any]:
        import diffusers
        import torch

        processors = sorted({type(p).__name__ for p in self.pipe.unet.attn_processors.values()})
        return {"implementation": f"diffusers {type(self.pipe).__name__} (weights via diffusers' LDM converters)",
                "device": self.device, "dtype": str(self.dtype).removeprefix("torch."),
                "attention": f"UNet/VAE {', '.join(processors)} (SDPA); text encoder "
                             f"{getattr(self.pipe.text_encoder.config, '_attn_implementation', '?')}",
                "scheduler": type(self.pipe.scheduler).__name__, "diffusers": diffusers.__version__,
                "torch": torch.__version__, "weights": WEIGHTS_NOTE if self.device == "cpu" else None,
                "threads": threads if self.device == "cpu" else None}

    def _sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def stage_calls(self, prompts: list[str], unet_feeds: dict, vae_feeds: dict,
                    long_prompts: list[str], long_context: Any) -> dict[str, Callable[[], Any]]:
        """One call per stage on fixed inputs; each returns only when its work is done. diffusers has no long
        prompts: its 3-chunk text stage encodes the same number of 77-token rows (3 per prompt) in one batch."""
        import torch

        pipe, dev, dtype = self.pipe, self.device, self.dtype
        tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(dev)
        chunk_rows = tokens.repeat(3, 1)
        sample = torch.from_numpy(unet_feeds["sample"]).to(dev, dtype)
        timestep = torch.from_numpy(unet_feeds["timestep"]).to(dev)
        context = torch.from_numpy(unet_feeds["encoder_hidden_states"]).to(dev, dtype)
        context_231 = torch.from_numpy(long_context).to(dev, dtype)
        latent = torch.from_numpy(vae_feeds["latent"]).to(dev, dtype)
        scale = pipe.vae.config.scaling_factor
        # SDXL: the UNet's added conditions, and both text encoders (penultimate states + bigG's pooled output)
        added = {k: torch.from_numpy(unet_feeds[k]).to(dev, dtype) for k in ("text_embeds", "time_ids")
                 if k in unet_feeds}
        unet_kwargs = {"added_cond_kwargs": added} if added else {}

        def encode(ids):
            if not self.sdxl:
                return pipe.text_encoder(ids)[0]
            first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            second = pipe.text_encoder_2(ids, output_hidden_states=True)
            return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds

        def run(fn):
            def call():
                with torch.inference_mode():
                    out = fn()
                self._sync()
                return out
            return call

        return {
            "tokenize": lambda: pipe.tokenizer(prompts, padding="max_length", truncation=True,
                                               max_length=pipe.tokenizer.model_max_length, return_tensors="pt"),
            "text_encoder": run(lambda: encode(tokens)),
            "text_encoder_3_chunks": run(lambda: encode(chunk_rows)),
            "unet": run(lambda: pipe.unet(sample, timestep, encoder_hidden_states=context, **unet_kwargs).sample),
            "unet_231_tokens": run(lambda: pipe.unet(sample, timestep, encoder_hidden_states=context_231,
                                                     **unet_kwargs).sample),
            # As rtsd's decoder stage: decode, map to [0, 1], bring to the host.
            "vae_decode": run(lambda: (pipe.vae.decode(latent / scale).sample / 2 + 0.5).clamp(0, 1).float().cpu()),
        }

    def generate(self, prompt: str, negative: str, latents: np.ndarray, steps: int, guidance: float,
                 height: int, width: int) -> tuple[np.ndarray, dict[str, float]]:
        """One whole generation to PIL images; returns (uint8 images, timings in seconds)."""
        import torch

        self._step_seconds = 0.0
        start = time.perf_counter()
        with torch.inference_mode():
            images = self.pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                               height=height, width=width, output_type="pil",
                               latents=torch.from_numpy(latents).to(self.device, self.dtype)).images
        self._sync()
        total = time.perf_counter() - start
        calls = len(self.pipe.scheduler.timesteps)
        return (np.stack([np.asarray(im) for im in images]),
                {"total": total, "scheduler_host_per_step": self._step_seconds / max(calls, 1)})

    def close(self) -> None:
        self.pipe = None


# ---------------------------------------------------------------------------------------------- rtsd Runtime

class RuntimeContender:
    """An rtsd ``Runtime`` (engines or the PyTorch reference) measured stage by stage and end to end."""

    def __init__(self, runtime, settings: dict, scheduler: str):
        self.runtime, self.config, self._settings, self.scheduler = runtime, runtime.config, settings, scheduler

    def settings(self, threads: int | None) -> dict:
        return self._settings

    def stage_calls(self, prompts: list[str], unet_feeds: dict, vae_feeds: dict, long_prompts: list[str],
                    long_context: Any) -> dict:
        rt = self.runtime
        xp, engines = rt.xp, rt.engines
        plan, long_plan = rt.text.prepare(prompts), rt.text.prepare(long_prompts)
        unet_in = {k: xp.asarray(v) for k, v in unet_feeds.items()}
        unet_231 = {**unet_in, "encoder_hidden_states": xp.asarray(long_context)}
        vae_in = {k: xp.asarray(v) for k, v in vae_feeds.items()}

        def run(engine, feeds, to_host=False):
            def call():
                out = engine.infer(feeds)
                if to_host:  # as the runtime's decode stage: the image comes back to the host
                    return engine.to_host(next(iter(out.values())))
                engine.synchronize()
                return out
            return call

        def encode(which):  # the runtime's text stage: one text-encoder call per chunk, joined on the device
            def call():
                out = rt.text.encode(engines["text_encoder"], which)
                engines["text_encoder"].synchronize()
                return out
            return call

        return {"tokenize": lambda: rt.text.prepare(prompts),
                "text_encoder": encode(plan), "text_encoder_3_chunks": encode(long_plan),
                "unet": run(engines["unet"], unet_in), "unet_231_tokens": run(engines["unet"], unet_231),
                "vae_decode": run(engines["vae_decoder"], vae_in, to_host=True)}

    def generate(self, prompt, negative, latents, steps, guidance, height, width):
        result = self.runtime.generate(prompt, negative, steps=steps, guidance_scale=guidance, height=height,
                                       width=width, scheduler=self.scheduler, latents=latents,
                                       scheduler_options=rtsd_scheduler_options(self.scheduler) or None)
        t = result.timings
        calls = max(round(t["denoise"] / t["unet_per_step"]), 1)
        return (np.stack([np.asarray(im) for im in result.images]),
                {"total": t["total"], "scheduler_host_per_step": t["scheduler_host"] / calls,
                 "denoise_per_step": t["unet_per_step"], "text_encoder": t["text_encoder"],
                 "vae_decode": t["vae_decode"]})

    def close(self) -> None:
        self.runtime.close()



def load_contender(name: str, *, checkpoint: str, device: str, scheduler: str, threads: int,
                   engine_dir: str | None, work: Path, ort_config: dict[str, str] | None = None):
    """Build contender ``name`` ("pytorch-reference", "diffusers", "tensorrt", "onnxruntime-cuda|cpu").

    ort_config: ONNX Runtime session config entries for an experiment (e.g. session.intra_op.allow_spinning=0);
    empty for rtsd as shipped.
    """
    if name in ("pytorch-reference", "diffusers"):
        import torch

        torch.set_num_threads(threads)
    if name == "diffusers":
        from rtsd.checkpoint import detect_config, open_checkpoint
        from rtsd.tokenizer import Tokenizer

        config = detect_config(open_checkpoint(checkpoint).shapes)
        Tokenizer.default(pad_token_id=config.text_encoder.pad_token_id).save(work / "tokenizer")
        return DiffusersContender(checkpoint, work / "tokenizer", scheduler, device)
    if name == "pytorch-reference":
        return RuntimeContender(reference_runtime(checkpoint, device), reference_settings(device, threads), scheduler)
    runtime = _engine_runtime(name, engine_dir, threads, ort_config)
    settings = _engine_settings(runtime, name)
    if ort_config:
        settings["session_config"] = ",".join(f"{k}={v}" for k, v in ort_config.items())
    return RuntimeContender(runtime, settings, scheduler)


def _engine_runtime(name: str, engine_dir: str, threads: int, ort_config: dict[str, str] | None):
    from rtsd.engine.onnxruntime import OnnxRuntimeBackend
    from rtsd.runtime import Runtime

    if name == "tensorrt":
        return Runtime(engine_dir, backend="tensorrt")
    import onnxruntime

    if name == "onnxruntime-cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise SystemExit("error: onnxruntime-cuda needs onnxruntime-gpu and a visible GPU")
    provider = "CUDAExecutionProvider" if name == "onnxruntime-cuda" else "CPUExecutionProvider"
    return Runtime(engine_dir, backend=OnnxRuntimeBackend(providers=[provider], threads=threads,
                                                           session_config=ort_config))


def _engine_settings(runtime, name: str) -> dict:
    from rtsd.export.manifest import Manifest

    record = Manifest.read(runtime.engine_dir).components["unet"]
    settings = {"implementation": "rtsd Runtime (NumPy scheduler loop)", "backend": runtime.backend_name}
    if name == "tensorrt":
        import tensorrt

        return {**settings, "dtype": "fp16 engines (fp32 I/O)", "tensorrt": tensorrt.__version__}
    import onnxruntime

    session = runtime.engines["unet"].session
    options = session.get_session_options()
    return {**settings, "providers": ",".join(session.get_providers()), "dtype": record["onnx"]["precision"],
            "graph_optimization": str(options.graph_optimization_level).rsplit(".", 1)[-1],
            "attention": "as exported: MatMul-Softmax-MatMul subgraph", "onnxruntime": onnxruntime.__version__,
            "weights": "ONNX Runtime's own copy (prepacked)",
            "threads": options.intra_op_num_threads or "ORT default (physical cores)"}
