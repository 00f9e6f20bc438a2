"""Read Stable Diffusion checkpoints: ``.safetensors``, ``.ckpt``/``.pt`` (weights_only) and diffusers folders.

Every format reads as the same thing: LDM single-file key names (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``) with their shapes and dtypes, known from file headers alone where the
format allows; tensors are loaded only on request. Architecture detection is ``rtsd.detection.detect_config``, a pure
function of those shapes. This module imports torch only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtsd import diffusers_keys
from rtsd.config import ModelConfig
from rtsd.detection import COMPONENT_PREFIXES, component_prefixes, detect_config
from rtsd.errors import CheckpointError, MissingDependencyError, UnsupportedModelError

if TYPE_CHECKING:
    import torch

__all__ = ["Checkpoint", "open_checkpoint", "model_config", "summarize", "detect_config", "read_prediction_type"]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Keys kept from a single-file checkpoint. ``conditioner.`` (SDXL's text encoders) is kept only so that detection can
# name the architecture; EMA copies (``model_ema.*``) and the DDPM schedule buffers at top level fall outside these.
MODEL_PREFIXES = (*COMPONENT_PREFIXES.values(), "conditioner.")
# Not weights of the networks rtsd runs: CLIP's position_ids buffer, OpenCLIP's contrastive-loss temperature.
IGNORED_KEYS = frozenset({
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.model.logit_scale",
})  # fmt: skip

_SAFETENSORS_DTYPES = {  # safetensors dtype tag -> (name, bytes per element)
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; larger means corrupt

# Checkpoints written with transformers < 4.?? lack the ``text_model.`` level; SD 1.x files exist in both spellings.
_LEGACY_CLIP = re.compile(r"^cond_stage_model\.transformer\.(embeddings|encoder|final_layer_norm)\.")
# LDM VAE attention is 1x1 conv (4-D); files converted from diffusers sometimes store it as Linear (2-D).
_VAE_ATTN_WEIGHT = re.compile(r"^first_stage_model\.(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


@dataclass(frozen=True)
class _Source:
    """Where one LDM tensor lives: (file, key) parts concatenated on dim 0 (usually one), viewed as ``shape``."""

    parts: tuple[tuple[Path, str], ...]
    shape: tuple[int, ...]
    transpose: bool = False  # stored transposed (a diffusers Linear weight for an LDM x @ P matrix)


class Checkpoint:
    """One opened checkpoint. Cheap: shapes and dtypes come from headers; ``tensors()`` loads (needs torch)."""

    def __init__(self, path: Path, format: str, sources: dict[str, _Source], dtypes: dict[str, str],
                 weight_files: Iterable[Path], pickled: Mapping[Path, dict[str, Any]] | None = None):  # fmt: skip
        self.path = path
        self.format = format  # "safetensors" | "pickle" | "diffusers"
        self.shapes: dict[str, tuple[int, ...]] = {key: src.shape for key, src in sources.items()}
        self.dtypes: dict[str, str] = dtypes
        self._sources = sources
        self._weight_files: list[Path] = sorted(weight_files)
        self._pickled = dict(pickled or {})  # pickled state dicts, loaded (memory-mapped) while opening
        self._sha256: str | None = None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, tensors={len(self.shapes)})"

    def tensors(self, dtype: "torch.dtype | None" = None,
                dtypes_by_prefix: "Mapping[str, torch.dtype] | None" = None) -> dict[str, "torch.Tensor"]:
        """All model tensors under their LDM keys, in stored dtype unless ``dtype`` is given; ``dtypes_by_prefix``
        overrides it for keys under a prefix (cast as each tensor is read: one copy of the weights in memory)."""
        torch = _import_torch("Loading checkpoint tensors")
        by_file: dict[Path, list[tuple[str, int, str]]] = {}
        for ldm_key, src in self._sources.items():
            for index, (file, key) in enumerate(src.parts):
                by_file.setdefault(file, []).append((ldm_key, index, key))
        out: dict[str, torch.Tensor] = {}
        pending: dict[str, dict[int, torch.Tensor]] = {}  # packed tensors whose parts are still being read
        for file, entries in by_file.items():
            with _open_tensors(self._pickled, file) as get:
                for ldm_key, index, key in entries:
                    src = self._sources[ldm_key]
                    if len(src.parts) == 1:
                        tensor = get(key)
                        out[ldm_key] = _as_stored(tensor.T if src.transpose else tensor, src.shape,
                                                  _dtype_of(ldm_key, dtype, dtypes_by_prefix))
                        continue
                    parts = pending.setdefault(ldm_key, {})
                    parts[index] = get(key)
                    if len(parts) == len(src.parts):
                        packed = torch.cat([parts[i] for i in range(len(parts))])
                        out[ldm_key] = _as_stored(packed, src.shape, _dtype_of(ldm_key, dtype, dtypes_by_prefix))
                        del pending[ldm_key]
        return out

    def sha256(self) -> str:
        """SHA-256 of the checkpoint file; for a diffusers folder, of its weight files' bytes in sorted path order."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            for file in self._weight_files:
                with open(file, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256


def open_checkpoint(path: "str | Path | Checkpoint") -> Checkpoint:
    """Open a .safetensors/.ckpt/.pt/.pth file or a diffusers folder; CheckpointError when it cannot be read.
    An opened Checkpoint is returned as it is (a pickle is not read twice)."""
    if isinstance(path, Checkpoint):
        return path
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _open_diffusers(path)
    _require_regular_file(path, "checkpoint")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        checkpoint = _single_file(path, "safetensors", read_safetensors_header(path))
    elif suffix in PICKLE_SUFFIXES:
        state = _load_pickle(path)
        entries = {k: (tuple(t.shape), _torch_dtype_name(t)) for k, t in state.items()}
        checkpoint = _single_file(path, "pickle", entries, pickled={path: state})
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint extension '{path.suffix}'; expected .safetensors, .ckpt, .pt, .pth "
            "or a diffusers folder"
        )
    return checkpoint


# ------------------------------------------------------------------------------------------------------ single file


def _single_file(
    path: Path, format: str, entries: Mapping[str, tuple[tuple[int, ...], str]], pickled=None
) -> Checkpoint:
    sources: dict[str, _Source] = {}
    dtypes: dict[str, str] = {}
    for key, (shape, dtype) in entries.items():
        if not key.startswith(MODEL_PREFIXES) or key in IGNORED_KEYS:
            continue
        ldm_key = _LEGACY_CLIP.sub(r"cond_stage_model.transformer.text_model.\1.", key)
        if ldm_key in IGNORED_KEYS:
            continue
        if _VAE_ATTN_WEIGHT.match(ldm_key) and len(shape) == 2:
            shape = (*shape, 1, 1)
        sources[ldm_key] = _Source(((path, key),), tuple(shape))
        dtypes[ldm_key] = dtype
    if not sources:
        raise CheckpointError(_no_model_keys_message(path, entries))
    return Checkpoint(path, format, sources, dtypes, [path], pickled)


def _no_model_keys_message(path: Path, entries: Iterable[str]) -> str:
    keys = sorted(entries)
    examples = ", ".join(f"'{k}'" for k in keys[:3]) or "none"
    hint = ""
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "conv_in.")) for k in keys):
        hint = "; this looks like one diffusers component: pass the diffusers folder (with model_index.json) instead"
    return (
        f"{path}: no Stable Diffusion model tensors (keys under model.diffusion_model., first_stage_model., "
        f"cond_stage_model.); found {len(keys)} tensors such as {examples}{hint}"
    )


def read_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype name) from a safetensors header, after checking every size against the file length."""
    _require_regular_file(path, "safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, shorter than its 8-byte header)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > _MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file: header length {header_len} bytes runs past the "
                f"end of the file ({size} bytes)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file: header is not a JSON object")
    data_size = size - 8 - header_len
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            tag, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            name, itemsize = _SAFETENSORS_DTYPES[tag]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors file: bad header entry for '{key}': {info}") from None
        if not (0 <= begin <= end) or end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(
                f"{path}: corrupt safetensors file: tensor '{key}' ({tag} {list(shape)}) has data offsets "
                f"[{begin}, {end}] that do not match its size"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor '{key}' ends at byte {8 + header_len + end} but the "
                f"file has {size} bytes"
            )
        out[key] = (shape, name)
    return out


def _load_pickle(path: Path) -> dict[str, "torch.Tensor"]:
    """A pickled state dict through ``torch.load(weights_only=True)``; never unpickles arbitrary objects."""
    import pickle

    torch = _import_torch(f"Reading {path.suffix} checkpoints")
    _require_regular_file(path, "checkpoint")
    try:
        # mmap needs the zip format torch.save has written since 1.6; older files load into memory.
        with warnings.catch_warnings():
            # torch warns about pickle protocols other than 2 (common in Lightning .ckpt files) and the like; the
            # weights-only unpickler already refuses anything unsafe, so these lines only alarm users.
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {_first_line(exc)}") from None
        raise CheckpointError(
            f"{path}: the file contains non-tensor Python objects that rtsd will not unpickle (unsafe); convert it "
            "to .safetensors with a tool you trust, or re-save only its state_dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint: {_first_line(exc)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict (the file holds a {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _require_regular_file(path: Path, what: str) -> None:
    """Refuse FIFOs, devices and sockets before opening: reading a FIFO blocks forever, a device never ends."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({_first_line(exc)})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket); pass the {what} file itself")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------- diffusers folder

_DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder")
# A diffusers text encoder is a transformers CLIPTextModel either way; its activation tells what it was converted
# from (and which math it needs): OpenAI CLIP ViT-L/14 (SD 1.x) or OpenCLIP ViT-H/14 (SD 2.x).
_TEXT_ENCODER_BY_ACTIVATION = {"quick_gelu": diffusers_keys.clip_to_ldm, "gelu": diffusers_keys.open_clip_to_ldm}


def _open_diffusers(path: Path) -> Checkpoint:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(
            f"{path} is a directory but not a diffusers model folder (no model_index.json); pass a .safetensors or "
            ".ckpt file, or a folder with model_index.json, unet/, vae/ and text_encoder/"
        )
    index = _read_json(index_file)
    sdxl = "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index or (path / "text_encoder_2").is_dir()
    components = _SDXL_COMPONENTS if sdxl else _DIFFUSERS_COMPONENTS
    if sdxl and not (path / "text_encoder").is_dir() and not any(index.get("text_encoder") or ()):
        components = tuple(c for c in components if c != "text_encoder")  # the refiner: bigG alone
    missing = [name for name in components if not (path / name).is_dir()]
    if missing:
        error = UnsupportedModelError if sdxl else CheckpointError  # an XL pipeline without its parts: not SDXL
        raise error(f"{path}: {'SDXL ' if sdxl else ''}diffusers folder lacks {', '.join(m + '/' for m in missing)}")

    sources: dict[str, _Source] = {}
    dtypes: dict[str, str] = {}
    weight_files: list[Path] = []
    pickled: dict[Path, dict[str, Any]] = {}
    for name in components:
        folder = path / name
        config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        to_ldm = _sdxl_key_mapping(name, components) if sdxl and name.startswith("text_encoder") else \
            _key_mapping(folder, name, config)
        entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        for file in _component_weight_files(folder):
            weight_files.append(file)
            if file.suffix == ".safetensors":
                for key, (shape, dtype) in read_safetensors_header(file).items():
                    entries[key] = (file, shape, dtype)
            else:
                state = pickled[file] = _load_pickle(file)
                for key, tensor in state.items():
                    entries[key] = (file, tuple(tensor.shape), _torch_dtype_name(tensor))
        _cross_check(folder, name.removesuffix("_2"), config, {k: shape for k, (_, shape, _) in entries.items()})
        for ldm_key, src in to_ldm({k: shape for k, (_, shape, _) in entries.items()}).items():
            sources[ldm_key] = _Source(tuple((entries[key][0], key) for key in src.keys), src.shape, src.transpose)
            dtypes[ldm_key] = entries[src.key][2]
    return Checkpoint(path, "diffusers", sources, dtypes, weight_files, pickled)


_SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _sdxl_key_mapping(name: str, components: tuple[str, ...]):
    """SDXL: text_encoder/ is CLIP ViT-L (embedder 0); text_encoder_2/ is bigG (embedder 1, or 0 in the refiner)."""
    if name == "text_encoder":
        return functools.partial(diffusers_keys.sdxl_text_to_ldm, index=0, open_clip=False)
    return functools.partial(diffusers_keys.sdxl_text_to_ldm, index=int("text_encoder" in components), open_clip=True)


def _key_mapping(folder: Path, name: str, config: Mapping[str, Any]):
    if name == "unet":
        return diffusers_keys.unet_to_ldm
    if name == "vae":
        return diffusers_keys.vae_to_ldm
    activation = config.get("hidden_act", "quick_gelu")  # transformers' CLIPTextConfig default
    if activation not in _TEXT_ENCODER_BY_ACTIVATION:
        raise UnsupportedModelError(
            f"{folder}/config.json: hidden_act '{activation}' is neither OpenAI CLIP's quick_gelu (SD 1.x) nor "
            "OpenCLIP's gelu (SD 2.x); rtsd supports SD 1.x and 2.x text encoders"
        )
    return _TEXT_ENCODER_BY_ACTIVATION[activation]


def _component_weight_files(folder: Path) -> list[Path]:
    """The weight files of one component: all shards of the plain (non-variant) weights, else of the one variant."""
    for suffix in (".safetensors", ".bin"):
        files = sorted(folder.glob(f"*{suffix}"))
        if not files:
            continue
        plain = [f for f in files if "." not in f.name[: -len(suffix)]]
        if plain:
            return plain
        variants = {f.name[: -len(suffix)].rsplit(".", 1)[1] for f in files}
        if len(variants) == 1:
            return files
        raise CheckpointError(f"{folder}: several weight variants ({', '.join(sorted(variants))}) and no plain one")
    raise CheckpointError(f"{folder}: no weight files (*.safetensors or *.bin)")


# What each component's config.json says, and the tensor whose shape must agree with it.
_CONFIG_CHECKS = {
    "unet": [("in_channels", "conv_in.weight", 1), ("out_channels", "conv_out.weight", 0)],
    "vae": [("latent_channels", "post_quant_conv.weight", 1), ("in_channels", "encoder.conv_in.weight", 1)],
    "text_encoder": [("hidden_size", "embeddings.token_embedding.weight", 1),
                     ("vocab_size", "embeddings.token_embedding.weight", 0)],
}  # fmt: skip


def _cross_check(folder: Path, name: str, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The weights are the truth; a config.json that disagrees means a broken folder, so say so."""
    flat = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    for field, key, dim in _CONFIG_CHECKS[name]:
        if field in config and key in flat and config[field] != flat[key][dim]:
            raise CheckpointError(
                f"{folder}/config.json says {field}={config[field]} but the weights have {flat[key][dim]} "
                f"('{key}' is {list(flat[key])}); the folder is inconsistent"
            )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot be read as JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


# ------------------------------------------------------------------------------------------------------ tensor access


@contextlib.contextmanager
def _open_tensors(pickled: Mapping[Path, Mapping[str, Any]], file: Path):
    """Yield ``get(key) -> Tensor`` for one weight file: a state dict loaded at open, or safetensors memory-mapped."""
    if file in pickled:
        yield pickled[file].__getitem__
        return
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: cannot be read as safetensors: {_first_line(exc)}") from None
    with handle:
        yield handle.get_tensor


def _dtype_of(key: str, dtype, by_prefix) -> "torch.dtype | None":
    return next((d for prefix, d in (by_prefix or {}).items() if key.startswith(prefix)), dtype)


def _as_stored(tensor: "torch.Tensor", shape: tuple[int, ...], dtype: "torch.dtype | None") -> "torch.Tensor":
    if tuple(tensor.shape) != shape:
        tensor = tensor.reshape(shape)
    return tensor if dtype is None else tensor.to(dtype)


def _import_torch(purpose: str):
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "export", purpose) from None
    return torch


def _torch_dtype_name(tensor: "torch.Tensor") -> str:
    return str(tensor.dtype).removeprefix("torch.")


# -------------------------------------------------------------------------------------------- prediction type, info

_PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction"}
_MAX_YAML_BYTES = 256 * 1024  # LDM's v1-inference.yaml is ~2 KB; the cap only stops a hostile or wrong file


def read_prediction_type(checkpoint_path: str | Path) -> str | None:
    """Prediction type from the files beside the weights, or None when they say nothing.

    Single file: the original-config YAML with the same stem (``model.params.parameterization``: ``"v"`` ->
    ``"v_prediction"``, absent -> ``"epsilon"``). Diffusers folder: ``scheduler/scheduler_config.json``.
    """
    path = Path(checkpoint_path)
    if path.is_dir():
        config_file = path / "scheduler" / "scheduler_config.json"
        if not config_file.is_file():
            return None
        value = _read_json(config_file).get("prediction_type", "epsilon")
        if value not in ("epsilon", "v_prediction"):
            raise UnsupportedModelError(
                f"{config_file}: prediction_type '{value}': rtsd supports epsilon and v_prediction"
            )
        return value
    yaml_file = path.with_suffix(".yaml")
    if not yaml_file.is_file():
        return None
    value = _yaml_parameterization(yaml_file)
    if value is None:
        return "epsilon"
    if value not in _PARAMETERIZATION:
        raise UnsupportedModelError(f"{yaml_file}: parameterization '{value}': rtsd supports 'eps' and 'v'")
    return _PARAMETERIZATION[value]


def _yaml_parameterization(yaml_file: Path) -> str | None:
    _require_regular_file(yaml_file, "original-config YAML")
    size = yaml_file.stat().st_size
    if size > _MAX_YAML_BYTES:
        raise CheckpointError(f"{yaml_file}: {size} bytes is far more than an original-config YAML holds "
                              f"(at most {_MAX_YAML_BYTES // 1024} KiB); remove it or replace it with the real one")
    try:
        text = yaml_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{yaml_file}: cannot be read ({_first_line(exc)})") from None
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is None:
        # Minimal read without PyYAML: the only key named 'parameterization' in LDM configs is model.params'.
        match = re.search(r"^\s*parameterization:\s*[\"']?([\w-]+)", text, flags=re.MULTILINE)
        return match.group(1) if match else None
    try:
        # compose() builds the node graph without constructing Python objects: an alias is one shared node, so an
        # alias bomb (a: &a [x, x], b: &b [*a, *a], ...) stays as small as its text instead of expanding to GBs.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{yaml_file}: not valid YAML ({_first_line(exc)})") from None
    node = root
    for key in ("model", "params", "parameterization"):
        node = _yaml_child(node, key)
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
        return None
    if not isinstance(node, yaml.ScalarNode):
        raise CheckpointError(f"{yaml_file}: model.params.parameterization must be a plain value ('eps' or 'v'), "
                              f"got a YAML {node.id}; fix or remove the YAML")
    return str(node.value)


def _yaml_child(node, key: str):
    """The value node under ``key`` of a YAML mapping node, or None; never builds the rest of the document."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return value_node
    return None


def model_config(checkpoint: Checkpoint) -> ModelConfig:
    """The architecture detected from the weights, with the prediction type the files beside them name.

    Weights cannot tell epsilon from v-prediction; without an original-config YAML or a diffusers
    ``scheduler/scheduler_config.json`` the config keeps the epsilon default.
    """
    return _with_prediction_type(detect_config(checkpoint.shapes), read_prediction_type(checkpoint.path))


def _with_prediction_type(config: ModelConfig, prediction_type: str | None) -> ModelConfig:
    if prediction_type is None:
        return config
    return replace(config, scheduler=replace(config.scheduler, prediction_type=prediction_type))


def summarize(checkpoint: Checkpoint) -> dict[str, Any]:
    """What ``rtsd info`` prints: family, per-component parameter/tensor counts, dtypes, detected config."""
    said = read_prediction_type(checkpoint.path)
    config = _with_prediction_type(detect_config(checkpoint.shapes), said)
    source = "checkpoint config" if said is not None else "default (nothing beside the checkpoint says)"
    components = {}
    for name, prefix in component_prefixes(config).items():
        shapes = [shape for key, shape in checkpoint.shapes.items() if key.startswith(prefix)]
        components[name] = {"parameters": sum(math.prod(s) for s in shapes), "tensors": len(shapes)}
    return {
        "path": str(checkpoint.path),
        "format": checkpoint.format,
        "family": config.family,
        "inpainting": config.is_inpainting,
        "components": components,
        "dtypes": sorted(set(checkpoint.dtypes.values())),
        "tensors": len(checkpoint.shapes),
        "prediction_type": config.prediction_type,
        "prediction_type_source": source,
        "config": config.to_dict(),
    }
