"""Textual-inversion embeddings: files -> named vectors, found in prompts by their name's tokens (as A1111 does).

Formats (detected from content, not the extension):
- A1111 / original textual-inversion ``.pt``: ``{"string_to_param": {"*": (n, C)}, "name": ..., ...}``
- ``.safetensors`` (kohya and A1111's safetensors export): ``{"emb_params": (n, C)}``
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{token: (C,) or (n, C)}``, one entry
- SDXL ``.safetensors``: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, joined to (n, 2048) rows for the base (the
  refiner takes ``clip_g`` alone)

The token that calls an embedding defaults to the file's stem (A1111's rule); in a prompt it matches wherever the
name's token ids appear, longest name first. ``.pt``/``.bin`` files are read without torch (rtsd.adapters.torch_zip).
Torch-free: the runtime loads embeddings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rtsd.errors import RtsdError

SUFFIXES = (".pt", ".bin", ".safetensors", ".ckpt")
FAMILIES_BY_WIDTH = {768: "SD 1.x (CLIP ViT-L, 768-d)", 1024: "SD 2.x (OpenCLIP ViT-H, 1024-d)",
                     1280: "SDXL's second text encoder (OpenCLIP ViT-bigG, 1280-d)"}
MAX_VECTORS = 75  # one chunk: an embedding never straddles two


class EmbeddingError(RtsdError, ValueError):
    """An embedding file that cannot be used with this model; the message names the file and the fix."""


@dataclass(frozen=True)
class Embedding:
    token: str
    vectors: np.ndarray  # (n, C) float32
    path: str
    sha256: str

    def describe(self) -> dict:
        return {"token": self.token, "vectors": int(self.vectors.shape[0]), "file": Path(self.path).name,
                "sha256": self.sha256}


def read_vectors(path: str | Path, sdxl_parts: Sequence[str] = ()) -> np.ndarray:
    """The (n, C) float32 vectors stored in a textual-inversion file of any supported format.

    sdxl_parts: for SDXL models, which of an SDXL file's ``clip_l`` (ViT-L) / ``clip_g`` (bigG) vectors to take, in
    text-encoder order; they are joined along the width as the model's context joins the encoders' states."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding file {path} does not exist")
    data = _read_file(path)
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path} holds a {type(data).__name__}, not a textual-inversion embedding")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: 'string_to_param' must hold exactly one tensor, it has "
                                 f"{len(params) if isinstance(params, dict) else type(params).__name__}")
        vectors = next(iter(params.values()))
    elif "emb_params" in data:
        vectors = data["emb_params"]
    elif {"clip_l", "clip_g"} <= set(data):
        if not sdxl_parts:
            raise EmbeddingError(f"{path} is an SDXL embedding (clip_l + clip_g vectors); use it with an SDXL model")
        parts = [np.asarray(data[name]) for name in sdxl_parts]
        if len({p.shape[0] for p in parts}) != 1 or any(p.ndim != 2 for p in parts):
            raise EmbeddingError(f"{path}: clip_l and clip_g must hold the same number of vectors, got "
                                 f"{[p.shape for p in parts]}")
        vectors = np.concatenate(parts, axis=1)
    elif len(data) == 1 and isinstance(next(iter(data.values())), np.ndarray):
        vectors = next(iter(data.values()))  # diffusers learned_embeds: {token: vector(s)}
    else:
        raise EmbeddingError(f"{path} is not a textual-inversion embedding (no 'string_to_param', 'emb_params' or "
                             f"single {{token: vector}} entry; keys: {sorted(map(str, data))[:6]})")
    vectors = np.asarray(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or not vectors.shape[0] or not np.issubdtype(vectors.dtype, np.floating):
        raise EmbeddingError(f"{path}: expected float vectors of shape (n, width), got {vectors.dtype} {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: the vectors contain NaN or infinity")
    return vectors.astype(np.float32)


def _read_file(path: Path):
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:2] == b"PK":
        from rtsd.adapters import torch_zip

        try:
            return torch_zip.load(path)
        except torch_zip.TorchFileError as exc:
            raise EmbeddingError(str(exc)) from None
    try:
        from safetensors.numpy import load_file

        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for foreign files
        raise EmbeddingError(f"{path} is neither a torch.save zip nor a .safetensors file ({exc})") from None


class EmbeddingStore:
    """The embeddings loaded for one model: width-checked, found in prompts by their name's token ids."""

    def __init__(self, width: int, family: str, encode: "callable", sdxl_parts: Sequence[str] = ()):
        self.width, self.family, self._encode, self.sdxl_parts = width, family, encode, tuple(sdxl_parts)
        self._by_token: dict[str, Embedding] = {}
        self._by_first_id: dict[int, list[tuple[list[int], Embedding]]] = {}

    def __len__(self) -> int:
        return len(self._by_token)

    def __contains__(self, token: str) -> bool:
        return token in self._by_token

    def __getitem__(self, token: str) -> Embedding:
        return self._by_token[token]

    def load(self, path: str | Path, token: str | None = None) -> Embedding:
        """Read ``path`` and make it callable as ``token`` (default: the file's stem); replaces a same-named one."""
        path = Path(path)
        token = path.stem if token is None else token
        if not isinstance(token, str) or not token.strip():
            raise EmbeddingError(f"the token for {path} must be a non-empty string, got {token!r}")
        vectors = read_vectors(path, self.sdxl_parts)
        if self.sdxl_parts and vectors.shape[1] != self.width:
            raise EmbeddingError(f"{path.name} is not an SDXL embedding ({vectors.shape[1]}-d vectors; this "
                                 f"{self.family} model needs clip_l/clip_g vectors of {self.width} in all)")
        if vectors.shape[1] != self.width:
            made_for = FAMILIES_BY_WIDTH.get(vectors.shape[1], f"a model with {vectors.shape[1]}-d text embeddings")
            raise EmbeddingError(f"{path.name} was made for {made_for}: its vectors are {vectors.shape[1]}-d, this "
                                 f"{self.family} model needs {self.width}-d; use an embedding trained for "
                                 f"{self.family}")
        if vectors.shape[0] > MAX_VECTORS:
            raise EmbeddingError(f"{path.name} has {vectors.shape[0]} vectors, more than the {MAX_VECTORS} tokens a "
                                 f"prompt chunk holds")
        ids = self._encode([token])[0]
        if not ids:
            raise EmbeddingError(f"the token {token!r} for {path.name} has no text to match in prompts")
        embedding = Embedding(token, vectors, str(path), hashlib.sha256(path.read_bytes()).hexdigest())
        self.remove(token)
        self._by_token[token] = embedding
        entries = self._by_first_id.setdefault(ids[0], [])
        entries.append((ids, embedding))
        entries.sort(key=lambda entry: -len(entry[0]))  # longest name first, as A1111 matches
        return embedding

    def load_dir(self, directory: str | Path) -> list[Embedding]:
        """Every embedding file under ``directory`` (A1111's embeddings folder), each called by its stem."""
        directory = Path(directory)
        if not directory.is_dir():
            raise EmbeddingError(f"embeddings directory {directory} does not exist")
        files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        return [self.load(p) for p in files]

    def remove(self, token: str) -> None:
        self._by_token.pop(token, None)
        for entries in self._by_first_id.values():
            entries[:] = [e for e in entries if e[1].token != token]

    def match(self, tokens: Sequence[int], position: int) -> tuple[str, int, int] | None:
        """(token, vector count, ids spanned) of the longest embedding name starting at ``position``, or None."""
        for ids, embedding in self._by_first_id.get(tokens[position], ()):
            if list(tokens[position: position + len(ids)]) == ids:
                return embedding.token, int(embedding.vectors.shape[0]), len(ids)
        return None
