"""LoRA files (kohya/A1111, PEFT/diffusers, LoCon, LyCORIS LoHa/LoKr/Tucker) -> weight deltas per LDM checkpoint key.

``read_lora(path)`` reads a file (``.safetensors`` directly, ``.pt``/``.ckpt`` through ``torch.load(weights_only=True)``
only); ``lora_deltas(lora, table, family)`` matches every module of it against a model's LoRA table (lora_keys.py)
and returns ``{ldm_key: delta}`` at scale 1, in the checkpoint's layout, float32. Matching is strict: one key that
fits no weight of the model fails the whole file with one line, so nothing is ever applied in part.

Merge maths (``W += scale * delta``):
  LoRA / LoCon   delta = alpha/rank * up @ down            (conv: the product reshaped to the kernel)
  Tucker (mid)   delta = alpha/rank * sum_ij up[:, i] mid[i, j] down[j, :]   per kernel tap
  LoHa           delta = alpha/rank * (w1a @ w1b) * (w2a @ w2b)
  LoKr           delta = kron(w1, w2) (* alpha/rank when a factor is stored decomposed, as ComfyUI and A1111 do)
An update narrower than an inpainting UNet's 9-channel conv_in is zero-padded to it (A1111's rule).

NumPy/stdlib only: the runtime merges without torch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from rtsd.adapters.lora_keys import Target, kohya_names, peft_module
from rtsd.errors import CheckpointError, RtsdError

# Longest first: a module's name is the key minus the first of these it ends with.
SUFFIXES = sorted((
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha",
    "lora_A.weight", "lora_B.weight", "lora_A.default.weight", "lora_B.default.weight",
    "lora_linear_layer.down.weight", "lora_linear_layer.up.weight", "down.weight", "up.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
), key=len, reverse=True)
_ROLE = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_A.default.weight": "down",
         "lora_linear_layer.down.weight": "down", "down.weight": "down",
         "lora_up.weight": "up", "lora_B.weight": "up", "lora_B.default.weight": "up",
         "lora_linear_layer.up.weight": "up", "up.weight": "up", "lora_mid.weight": "mid"}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}
_MAX_SHOWN = 3


class LoraError(RtsdError, ValueError):
    """A LoRA file that does not fit the model, or that cannot be read."""


@dataclass
class LoraFile:
    path: Path
    sha256: str
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def record(self, scale: float) -> dict:
        """What the manifest / PNG metadata say about this LoRA at ``scale``."""
        return {"name": self.name, "sha256": self.sha256, "scale": float(scale)}


def read_lora(path: str | Path) -> LoraFile:
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    sha = _sha256(path)
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
    elif path.suffix in (".pt", ".ckpt", ".pth", ".bin"):
        from rtsd.checkpoint import _load_pickle  # torch.load(weights_only=True): refuses pickled objects

        tensors = {k: v.float().numpy() for k, v in _load_pickle(path).items()}
        metadata = {}
    else:
        raise LoraError(f"{path}: LoRA files are .safetensors, .pt or .ckpt; got {path.suffix or 'no suffix'}")
    if not tensors:
        raise LoraError(f"{path}: holds no tensors; not a LoRA file")
    return LoraFile(path, sha, tensors, metadata)


def lora_deltas(lora: LoraFile, table: Mapping[str, Target], family: str) -> dict[str, np.ndarray]:
    """``{ldm_key: delta}`` at scale 1 for every module of ``lora``; one LoraError when any key does not fit."""
    kohya = kohya_names(table)
    modules: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    problems: list[str] = []
    for key, value in lora.tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            problems.append(f"{key} (not a LoRA/LoHa/LoKr tensor)")
            continue
        modules[key[: -len(suffix) - 1]][suffix] = value
    deltas: dict[str, np.ndarray] = {}
    for module, parts in modules.items():
        path = kohya.get(module) if module.startswith("lora_") else peft_module(module)
        target = table.get(path) if path else None
        if target is None:
            problems.append(f"{module} (no such weight in this model)")
            continue
        try:
            delta = _pad_conv_in(target, module_delta(parts, _alpha(lora, path, parts)))
        except (LoraError, ValueError) as exc:
            problems.append(f"{module} ({exc})")
            continue
        if delta.shape != target.shape:
            problems.append(f"{module} (update {list(delta.shape)}, weight {list(target.shape)})")
            continue
        _add(deltas, target, delta)
    if problems:
        made_for = guess_family(lora.tensors)
        ours = FAMILY_NAMES.get(family, family)
        why = f"made for {made_for}, not for this {ours} model" if made_for not in (None, ours) else \
            f"does not fit this {ours} model"
        raise LoraError(f"LoRA {lora.name}: {why}: {len(problems)} of {len(modules)} modules do not match, e.g. "
                        f"{'; '.join(problems[:_MAX_SHOWN])}; nothing was applied")
    return deltas


def module_delta(parts: Mapping[str, np.ndarray], alpha: float | None) -> np.ndarray:
    """The weight update of one module at scale 1, in the weight's own layout (out, in[, kh, kw])."""
    roles = {_ROLE.get(k, k): np.asarray(v, dtype=np.float32) for k, v in parts.items() if k != "alpha"}
    if "up" in roles and "down" in roles:
        up, down = roles["up"], roles["down"]
        rank = down.shape[0]
        scale = (alpha / rank) if alpha is not None else 1.0
        if "mid" in roles:  # Tucker: up (out, r, 1, 1), mid (r, r, kh, kw), down (r, in, 1, 1)
            mid = roles["mid"]
            delta = np.einsum("oi,ijhw,jc->ochw", up.reshape(up.shape[0], -1), mid, down.reshape(rank, -1))
        else:
            product = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
            delta = product.reshape(up.shape[0], *down.shape[1:]) if down.ndim == 4 else product
        return (delta * np.float32(scale)).astype(np.float32)
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles.keys():
        rank = roles["hada_w1_b"].shape[0]
        scale = (alpha / rank) if alpha is not None else 1.0
        product = (roles["hada_w1_a"] @ roles["hada_w1_b"]) * (roles["hada_w2_a"] @ roles["hada_w2_b"])
        return (product * np.float32(scale)).astype(np.float32)  # reshaped to a kernel by the caller's shape check
    if any(k.startswith("lokr_") for k in roles):
        w1, rank1 = _factor(roles, "lokr_w1")
        w2, rank2 = _factor(roles, "lokr_w2")
        rank = rank2 or rank1
        scale = (alpha / rank) if alpha is not None and rank else 1.0
        if w2.ndim == 4:
            w1 = w1.reshape(*w1.shape, 1, 1)
        return (np.kron(w1, w2) * np.float32(scale)).astype(np.float32)
    raise LoraError(f"incomplete module: has {sorted(parts)}")


def _factor(roles, name: str) -> tuple[np.ndarray, int | None]:
    if name in roles:
        return roles[name], None
    if f"{name}_a" in roles and f"{name}_b" in roles:
        a, b = roles[f"{name}_a"], roles[f"{name}_b"]
        return (a @ b.reshape(b.shape[0], -1)).reshape(a.shape[0], *b.shape[1:]), b.shape[0]
    raise LoraError(f"LoKr module lacks {name} (or {name}_a and {name}_b)")


def _alpha(lora: LoraFile, path: str, parts: Mapping[str, np.ndarray]) -> float | None:
    """alpha: the module's .alpha tensor; else PEFT metadata (alpha_pattern, lora_alpha); else None (= rank)."""
    if "alpha" in parts:
        return float(np.asarray(parts["alpha"]).reshape(-1)[0])
    raw = lora.metadata.get("lora_adapter_metadata")
    if raw:
        config = json.loads(raw)
        component = path.split(".", 1)[0]
        module = path.split(".", 1)[1]
        for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
            if module.endswith(pattern):
                return float(value)
        if f"{component}.lora_alpha" in config:
            return float(config[f"{component}.lora_alpha"])
    return None


def _pad_conv_in(target: Target, delta: np.ndarray) -> np.ndarray:
    """A 4-channel conv_in update on a 9-channel inpainting conv_in: zero-padded (the extra channels keep theirs)."""
    if delta.ndim == 4 and target.key.endswith("input_blocks.0.0.weight") and delta.shape[1] < target.shape[1] \
            and delta.shape[0] == target.shape[0]:
        padded = np.zeros(target.shape, np.float32)
        padded[:, : delta.shape[1]] = delta
        return padded
    if delta.ndim == 2 and len(target.shape) == 4 and delta.size == int(np.prod(target.shape)):
        return delta.reshape(target.shape)  # LoHa/LoKr conv products come flat
    return delta


def _add(deltas: dict[str, np.ndarray], target: Target, delta: np.ndarray) -> None:
    """Accumulate into the whole LDM tensor (q/k/v updates land in their rows of the packed in_proj_weight)."""
    if target.rows is None:
        deltas[target.key] = deltas[target.key] + delta if target.key in deltas else delta
        return
    start, stop = target.rows
    full = deltas.setdefault(target.key, np.zeros((3 * target.shape[0], *target.shape[1:]), np.float32))
    full[start:stop] += delta


def guess_family(tensors: Mapping[str, np.ndarray]) -> str | None:
    """Which model family a LoRA was trained for, from its names and the widths it reads (None if it cannot tell)."""
    keys = list(tensors)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "add_embedding" in k for k in keys):
        return "SDXL"
    widths = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
    for key in keys:
        compact = key.replace(".", "_")
        reads_context = "attn2_to_k" in compact or "attn2_to_v" in compact
        reads_text = "self_attn_q_proj" in compact
        if (reads_context or reads_text) and any(r in key for r in ("lora_down", "lora_A", "hada_w1_b", ".down.")):
            width = tensors[key].shape[1] if tensors[key].ndim >= 2 else None
            if width in widths:
                return widths[width]
    return None


def stack_deltas(loras: list[tuple[LoraFile, float]], table: Mapping[str, Target],
                 family: str) -> dict[str, list[tuple[float, np.ndarray]]]:
    """``{ldm_key: [(scale, delta), ...]}`` for several LoRAs, in their order; every file is matched before any
    weight changes, so one bad file leaves the model as it was."""
    per_key: dict[str, list[tuple[float, np.ndarray]]] = defaultdict(list)
    for lora, scale in loras:
        for key, delta in lora_deltas(lora, table, family).items():
            per_key[key].append((float(scale), delta))
    return dict(per_key)


def merged(base: np.ndarray, deltas: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """``base + sum(scale * delta)`` in float32, always in this order (bake-in and run-time switch agree bit for bit)."""
    out = np.array(base, dtype=np.float32, copy=True)
    for scale, delta in deltas:
        out += np.float32(scale) * delta
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32}


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor as float32 (bf16 widened by hand: NumPy has no bfloat16) and the string metadata."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
            data = handle.read()
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for key, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        start, stop = info["data_offsets"]
        if dtype is None or stop > len(data):
            raise CheckpointError(f"{path}: tensor {key} has dtype {info.get('dtype')} or lies past the file's end")
        array = np.frombuffer(data[start:stop], dtype=dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = array.astype(np.float32)
    return tensors, dict(metadata)
