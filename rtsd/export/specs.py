"""The I/O contract of each sub-model, declared once.

ONNX dynamic axes, TensorRT optimization profiles, runtime buffer allocation and input validation all derive from
these declarations. Shapes are written with symbolic dimension names that ``IOSpec.dims`` resolves from one
request (images per call, height, width in pixels):

    batch          rows in this call: images x2 for the CFG-batched text encoder and UNet
    height, width  image size in pixels
    latent_height, latent_width   image size / the VAE's downsample factor (8)
    context_length the UNet's text context: 77 tokens x prompt chunks (1..max_prompt_tokens / 75)
    latent_height_divD, latent_width_divD   ceil(latent size / D) (D = 2, 4, 8): ControlNet residuals of deeper
                   UNet levels (stride-2 convolutions round up)

ControlNet (format 5): the UNet also takes one residual per input block plus the middle block (rtsd.control_layout;
13 for SD 1.x / 2.x), zeros when no ControlNet runs; each ControlNet engine takes the UNet's inputs plus the control
image at full resolution and one conditioning scale per residual, and returns the residuals, scaled.

Prompts longer than 75 tokens are split into chunks of 75 (rtsd.prompt); the text encoder encodes each chunk as a
77-token row (one call per chunk position, rows = images x2 as for one chunk) and the UNet takes the chunks joined
along the token axis. Textual-inversion vectors reach the text encoder as rows of ``extra_embeddings``: an id
``vocab_size + k`` in ``input_ids`` selects row k, so new embeddings need no re-export. The row count is fixed at
export (images x2 x 75: every token of a call could be one), unused rows are zeros.

This module is NumPy-only: the torch-free runtime imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from rtsd.config import ModelConfig
from rtsd.control_layout import residual_layout

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
DTYPES = ("float32", "float16", "int64", "int32")
CHUNK_LENGTH = 77  # token positions of one encoded chunk: bos, 75 prompt tokens, eos
CHUNK_TOKENS = CHUNK_LENGTH - 2
CONTEXT_AXIS = "context_length"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints are fixed, strings are symbolic dimension names

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "TensorSpec":
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class ShapeRange:
    """What the engines are built for, in user terms: images per call and image size in pixels.

    The default bounds (256..1024, opt 512) are multiples of 64, the sizes TensorRT kernels like best; any multiple
    of ``size_multiple`` (8: one latent pixel) between min and max is accepted at run time.
    """

    min_size: int = 256
    max_size: int = 1024
    opt_size: int = 512
    min_batch: int = 1
    max_batch: int = 4
    opt_batch: int = 1
    size_multiple: int = 8
    static: bool = False  # one fixed image shape (opt) for maximum TensorRT speed; prompt length stays dynamic
    max_prompt_tokens: int = 3 * CHUNK_TOKENS  # longest prompt, in multiples of 75 (chunks) up to max_chunks

    def __post_init__(self):
        m = self.size_multiple
        for label, value in (("min_size", self.min_size), ("max_size", self.max_size), ("opt_size", self.opt_size)):
            if value <= 0 or value % m:
                raise ValueError(f"{label}={value} must be a positive multiple of {m}")
        if not self.min_size <= self.opt_size <= self.max_size:
            raise ValueError(f"sizes must satisfy min_size <= opt_size <= max_size, got "
                             f"{self.min_size} <= {self.opt_size} <= {self.max_size}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batches must satisfy 1 <= min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch} <= {self.opt_batch} <= {self.max_batch}")
        tokens = self.max_prompt_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < CHUNK_TOKENS or tokens % CHUNK_TOKENS:
            raise ValueError(f"max_prompt_tokens={tokens!r} must be a positive multiple of {CHUNK_TOKENS} "
                             f"(prompts are encoded in chunks of {CHUNK_TOKENS} tokens), e.g. 225")

    @property
    def max_chunks(self) -> int:
        return self.max_prompt_tokens // CHUNK_TOKENS

    @classmethod
    def fixed(cls, batch: int, height: int, width: int, size_multiple: int = 8) -> "ShapeRange":
        """A static range: one batch and one square-or-not size (max of height/width bounds the profile)."""
        lo, hi = min(height, width), max(height, width)
        return cls(min_size=lo, max_size=hi, opt_size=lo, min_batch=batch, max_batch=batch, opt_batch=batch,
                   size_multiple=size_multiple, static=True)

    def check(self, batch: int, height: int, width: int) -> None:
        """Raise ValueError naming the supported range when a request is outside it."""
        for label, value in (("height", height), ("width", width)):
            if value % 8:
                raise ValueError(f"{label}={value} is not a multiple of 8; Stable Diffusion needs multiples of 8 "
                                 f"(these engines: multiples of {self.size_multiple})")
            if value % self.size_multiple:
                raise ValueError(f"{label}={value} is not a multiple of {self.size_multiple}, which these engines "
                                 f"need; use e.g. {value // self.size_multiple * self.size_multiple or self.size_multiple}")
            if not self.min_size <= value <= self.max_size:
                raise ValueError(f"{label}={value} is outside the exported range {self.min_size}..{self.max_size}; "
                                 f"re-export with --min-size/--max-size covering it")
        if not self.min_batch <= batch <= self.max_batch:
            raise ValueError(f"{batch} images per call is outside the exported range "
                             f"{self.min_batch}..{self.max_batch}; re-export with --max-batch {batch}")

    def check_chunks(self, chunks: int, what: str = "the prompt") -> None:
        """Raise ValueError naming the limit and the export flag when a prompt needs more chunks than exported."""
        if chunks > self.max_chunks:
            raise ValueError(f"{what} needs {chunks} chunks of {CHUNK_TOKENS} tokens, but these engines take at most "
                             f"{self.max_prompt_tokens} tokens ({self.max_chunks} chunk"
                             f"{'s' if self.max_chunks > 1 else ''}); shorten it or re-export with "
                             f"`rtsd export --max-prompt-tokens {chunks * CHUNK_TOKENS}`")

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping) -> "ShapeRange":
        return cls(**data)


@dataclass(frozen=True)
class IOSpec:
    """One sub-model's inputs and outputs. ``batch_factor`` is 2 where CFG doubles the rows (text encoder, UNet)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_factor: int
    downsample: int  # pixels per latent pixel

    def shapes(self, rows: int, height: int, width: int, chunks: int = 1) -> dict[str, tuple[int, ...]]:
        """Concrete shapes of every input and output for a call with ``rows`` batch rows (and a text context of
        ``chunks`` 77-token chunks)."""
        dims = {"batch": rows, "height": height, "width": width, CONTEXT_AXIS: CHUNK_LENGTH * chunks,
                "latent_height": height // self.downsample, "latent_width": width // self.downsample}
        for d in LEVEL_DIVISORS:
            dims[f"latent_height_div{d}"] = -(-dims["latent_height"] // d)
            dims[f"latent_width_div{d}"] = -(-dims["latent_width"] // d)
        return {t.name: t.resolve(dims) for t in self.inputs + self.outputs}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs}

    def profile(self, shape_range: ShapeRange) -> dict[str, dict[str, tuple[int, ...]]]:
        """min/opt/max shape of every input, for TensorRT optimization profiles and the manifest.

        The smallest profile shape uses min_batch rows (one image, guidance off); the largest uses max_batch images
        with CFG doubling. The text context spans 1 chunk (min, opt) to max_chunks; a static range fixes the image
        shape and batch only, so prompts of every exported length still run.
        """
        r = shape_range
        corners = {
            "min": self.shapes(r.min_batch, r.min_size, r.min_size, chunks=1),
            "opt": self.shapes(r.opt_batch * self.batch_factor, r.opt_size, r.opt_size, chunks=1),
            "max": self.shapes(r.max_batch * self.batch_factor, r.max_size, r.max_size, chunks=r.max_chunks),
        }
        if r.static:
            opt = corners["opt"]
            corners = {k: {name: _keep_context(tensor, opt[name], corners[k][name]) for name, tensor in self._all()}
                       for k in corners}
        return {t.name: {k: corners[k][t.name] for k in ("min", "opt", "max")} for t in self.inputs}

    def _all(self):
        return [(t.name, t) for t in self.inputs + self.outputs]

    def validate(self, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Check names, dtypes and shape consistency of ``feeds``; return the resolved symbolic dimensions.

        Raises TypeError for a wrong dtype and ValueError for wrong names or shapes, naming what was expected.
        """
        expected = [t.name for t in self.inputs]
        if sorted(feeds) != sorted(expected):
            raise ValueError(f"{self.name}: inputs must be named {expected}, got {sorted(feeds)}")
        dims: dict[str, int] = {}
        for spec in self.inputs:
            array = feeds[spec.name]
            if not isinstance(array, np.ndarray) and not hasattr(array, "__cuda_array_interface__"):
                raise TypeError(f"{self.name}.{spec.name}: expected an array, got {type(array).__name__}")
            if str(array.dtype) != spec.dtype:
                raise TypeError(f"{self.name}.{spec.name}: expected dtype {spec.dtype}, got {array.dtype}")
            if len(array.shape) != len(spec.shape):
                raise ValueError(f"{self.name}.{spec.name}: expected shape {_fmt(spec.shape)}, got {tuple(array.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
                if isinstance(want, int):
                    if want != got:
                        raise ValueError(f"{self.name}.{spec.name}: axis {axis} must be {want} "
                                         f"(shape {_fmt(spec.shape)}), got {tuple(array.shape)}")
                elif want == CONTEXT_AXIS and (got < CHUNK_LENGTH or got % CHUNK_LENGTH):
                    raise ValueError(f"{self.name}.{spec.name}: axis {axis} ({CONTEXT_AXIS}) must be a multiple of "
                                     f"{CHUNK_LENGTH} (77 tokens per prompt chunk), got {tuple(array.shape)}")
                elif dims.setdefault(want, got) != got:
                    raise ValueError(f"{self.name}.{spec.name}: '{want}' is {got} here but {dims[want]} in another "
                                     f"input (shape {_fmt(spec.shape)}, got {tuple(array.shape)})")
        for d in LEVEL_DIVISORS:  # ControlNet residuals: their sizes follow the latent's (rounded up per level)
            for axis in ("latent_height", "latent_width"):
                derived = f"{axis}_div{d}"
                if derived in dims and axis in dims and dims[derived] != -(-dims[axis] // d):
                    raise ValueError(f"{self.name}: '{derived}' is {dims[derived]}, but {axis} {dims[axis]} needs "
                                     f"{-(-dims[axis] // d)} (ceil({axis} / {d})): a residual of the wrong size")
        return dims

    def sample_inputs(self, rows: int, height: int, width: int, seed: int = 0,
                      chunks: int = 1) -> dict[str, np.ndarray]:
        """Deterministic inputs of the right shapes and value ranges (export tracing, parity checks, benchmarks).

        With ``extra_embeddings``, two token positions of each row select extra rows (textual-inversion vectors)."""
        rng = np.random.default_rng(seed)
        shapes = self.shapes(rows, height, width, chunks)
        feeds = {}
        extra = next((shapes[t.name][0] for t in self.inputs if t.name == "extra_embeddings"), 0)
        for spec in self.inputs:
            shape = shapes[spec.name]
            if spec.name == "input_ids":
                ids = rng.integers(0, 49406, size=shape)
                ids[:, 0], ids[:, -1] = 49406, 49407
                if extra:
                    ids[:, 2:4] = VOCAB_SIZE + rng.integers(0, extra, size=(shape[0], 2))
                feeds[spec.name] = ids.astype(spec.dtype)
            elif spec.name == "timestep":
                feeds[spec.name] = np.full(shape, 999.0 * rng.random(), dtype=spec.dtype)
            elif spec.name == "time_ids":  # sizes and crops in pixels (the refiner's aesthetic score: ~6)
                feeds[spec.name] = rng.integers(0, 1024, size=shape).astype(spec.dtype)
            elif spec.name in ("images", "control_image"):
                feeds[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
            elif spec.name == "conditioning_scale":
                feeds[spec.name] = rng.uniform(0.5, 1.5, size=shape).astype(spec.dtype)
            else:
                feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
        return feeds

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "batch_factor": self.batch_factor, "downsample": self.downsample}

    @classmethod
    def from_dict(cls, name: str, data: Mapping) -> "IOSpec":
        return cls(name, tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in data["outputs"]), data["batch_factor"], data["downsample"])


VOCAB_SIZE = 49408  # CLIP's; ids from here on select extra_embeddings rows


def extra_rows(shape_range: ShapeRange, batch_factor: int = 2) -> int:
    """Rows of ``extra_embeddings``: one per token position a text-encoder call can hold, so never too few."""
    return shape_range.max_batch * batch_factor * CHUNK_TOKENS


def residual_specs(config: ModelConfig) -> tuple[TensorSpec, ...]:
    """The ControlNet residuals the UNet takes (and a ControlNet engine returns), derived from the UNetConfig."""
    return tuple(TensorSpec(r.name, "float32", ("batch", r.channels, *_latent_dims(r.downsample)))
                 for r in residual_layout(config.unet))


def controlnet_spec(config: ModelConfig, component: str = "controlnet") -> IOSpec:
    """One ControlNet engine: the UNet's sample/timestep/context, the control image at full resolution ([0, 1] RGB)
    and one conditioning scale per residual -> the scaled residuals."""
    unet, f = config.unet, config.vae.downsample_factor
    residuals = residual_specs(config)
    return IOSpec(
        component,
        inputs=(TensorSpec("sample", "float32", ("batch", unet.in_channels, "latent_height", "latent_width")),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", "float32", ("batch", CONTEXT_AXIS, unet.context_dim)),
                TensorSpec("control_image", "float32", ("batch", 3, "height", "width")),
                TensorSpec("conditioning_scale", "float32", (len(residuals),))),
        outputs=residuals, batch_factor=2, downsample=f)


def specs_for(config: ModelConfig, shape_range: ShapeRange | None = None,
              control_residuals: bool = True) -> dict[str, IOSpec]:
    """The four sub-model contracts for one model configuration (``shape_range`` sizes ``extra_embeddings``);
    ``control_residuals``: the UNet takes ControlNet residuals (format 5 on; False: the UNet of older formats)."""
    te, unet, vae = config.text_encoder, config.unet, config.vae
    seq, width, f = te.max_position_embeddings, config.context_dim, vae.downsample_factor
    latent = ("batch", vae.embed_dim, "latent_height", "latent_width")
    image = ("batch", 3, "height", "width")
    extra = extra_rows(shape_range or ShapeRange())
    # SDXL: the pooled text embedding (text encoder output, UNet input) and the time ids (UNet input). Its
    # extra_embeddings rows are as wide as the context: each encoder takes its own columns (clip_l | clip_g).
    pooled = (TensorSpec("text_embeds", "float32", ("batch", config.pooled_dim)),) if config.pooled_dim else ()
    added = pooled + ((TensorSpec("time_ids", "float32", ("batch", config.num_time_ids)),) if pooled else ())
    extra_input = (TensorSpec("extra_embeddings", "float32", (extra, width)),)
    return {
        "text_encoder": IOSpec(
            "text_encoder",
            inputs=(TensorSpec("input_ids", "int64", ("batch", seq)), *extra_input),
            outputs=(TensorSpec("hidden_states", "float32", ("batch", seq, width)), *pooled),
            batch_factor=2, downsample=f),
        "unet": IOSpec(
            "unet",
            inputs=(TensorSpec("sample", "float32", ("batch", unet.in_channels, "latent_height", "latent_width")),
                    TensorSpec("timestep", "float32", ("batch",)),
                    TensorSpec("encoder_hidden_states", "float32", ("batch", CONTEXT_AXIS, unet.context_dim)),
                    *added,
                    *(residual_specs(config) if control_residuals else ())),
            outputs=(TensorSpec("model_output", "float32", ("batch", unet.out_channels, "latent_height", "latent_width")),),
            batch_factor=2, downsample=f),
        # The decoder maps to [0, 1] and the encoder takes [0, 1], so hosts never redo the VAE's [-1, 1] convention.
        "vae_decoder": IOSpec(
            "vae_decoder", inputs=(TensorSpec("latent", "float32", latent),),
            outputs=(TensorSpec("images", "float32", image),), batch_factor=1, downsample=f),
        "vae_encoder": IOSpec(
            "vae_encoder", inputs=(TensorSpec("images", "float32", image),),
            outputs=(TensorSpec("latent", "float32", latent),), batch_factor=1, downsample=f),
    }


def prompt_contract(config: ModelConfig, shape_range: ShapeRange, text_spec: IOSpec | None = None) -> dict:
    """How a host turns prompts into the UNet's context with these engines (the manifest's "prompt" record);
    ``text_spec``: the text encoder's declared I/O, whose extra_embeddings rows it quotes."""
    te = config.text_encoder
    spec = text_spec or specs_for(config, shape_range)["text_encoder"]
    rows = next((t.shape[0] for t in spec.inputs if t.name == "extra_embeddings"), 0)
    return {
        "chunk_length": CHUNK_LENGTH, "chunk_tokens": CHUNK_TOKENS, "max_chunks": shape_range.max_chunks,
        "max_prompt_tokens": shape_range.max_prompt_tokens, "context_axis": CONTEXT_AXIS,
        "chunk_ids": f"bos {te.bos_token_id}, up to {CHUNK_TOKENS} prompt tokens, eos {te.eos_token_id}, then "
                     f"pad {te.pad_token_id} to {CHUNK_LENGTH}",
        "text_encoder_calls": "one call per chunk position; rows = prompts (negative prompts first with CFG); "
                              "a prompt with fewer chunks gets the empty prompt's chunk",
        "context": f"the chunks' hidden_states joined along axis 1: (rows, {CHUNK_LENGTH} x chunks, "
                   f"{config.unet.context_dim})",
        "extra_embeddings": {"input": "extra_embeddings", "rows": rows, "first_id": te.vocab_size,
                             "rule": f"input id {te.vocab_size} + k uses row k instead of the token table; "
                                     "unused rows are zeros"},
        "emphasis": "A1111 'Original': each chunk's hidden_states row-wise times its token weights, then scaled "
                    "so the chunk's mean equals its unweighted mean",
    }


LEVEL_DIVISORS = (2, 4, 8, 16, 32)


def _latent_dims(downsample: int) -> tuple[str, str]:
    if downsample == 1:
        return "latent_height", "latent_width"
    return f"latent_height_div{downsample}", f"latent_width_div{downsample}"


def _keep_context(tensor: TensorSpec, opt: tuple[int, ...], corner: tuple[int, ...]) -> tuple[int, ...]:
    """A static corner: the opt shape, except along the prompt's context axis."""
    return tuple(c if d == CONTEXT_AXIS else o for d, o, c in zip(tensor.shape, opt, corner))


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
