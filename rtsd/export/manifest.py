"""engine_dir/manifest.json: the self-describing contract between the exporter and every runtime (Python or C++).

Layout (format_version 5; versions 1 to 4 still load: see below for what each lacks):

    format_version, rtsd_version, created
    source: {checkpoint, sha256, format}
    model: ModelConfig.to_dict()            (family, unet/vae/text_encoder hyper-parameters)
    scheduler: SchedulerDefaults            (num_train_timesteps, betas, prediction_type, spacing)
    tokenizer: {directory, max_length, pad_token_id, bos_token_id, eos_token_id}
    shape_range: ShapeRange.to_dict()       (images per call, image sizes, max_prompt_tokens the engines cover)
    prompt: specs.prompt_contract()         (chunking, context axis, extra_embeddings rule: for C++ hosts)
    components: {name: {onnx: {file, data_files, sha256, precision, data_sha256?}, io: IOSpec.to_dict(),
                        profile: {input: {min, opt, max}},
                        engines: {tensorrt: {file, sha256, precision, tensorrt_version, gpu, compute_capability,
                                             onnx_sha256, fp32_layers, refittable}}}}
    loras: [{name, sha256, scale}]          (version 3: LoRAs merged into the weights at export, in order)

Version 3 adds, for the UNet and text encoder, ``components[name]["weights_map"]``: checkpoint key -> ONNX
initializer + layout change + the byte range of its base values in the component's .onnx.data file (documented in
rtsd/export/weights_map.py), which LoRA switching and TensorRT refit follow; and ``loras``. TensorRT records gain
``refittable`` (plans built with the REFIT flag).

Version 5 (ControlNet) adds to the UNet's inputs one residual per UNet input block plus the middle block
(``down_residual_0..N``, ``mid_residual``; rtsd/control_layout.py, 13 for SD 1.x / 2.x; zeros when no ControlNet
runs), and ControlNet components ``controlnet.NAME`` (io: export/specs.controlnet_spec; record key ``controlnet``:
name, family, hint_channels, source {file, path, sha256, format}). Older directories generate as before; a request
with ControlNets, or ``rtsd export --add-controlnet``, is refused there with a message to re-export.

Optional fields (readers tolerate their absence; directories written before them still load): ``tokenizer.sha256``
{file: sha256} and ``onnx.data_sha256`` {data file: sha256}. Every path is relative to the engine directory and
stays inside it (``rtsd.engine.verify`` checks paths at read and hashes at load).
Format 2 (long prompts, textual inversion): the text encoder takes ``extra_embeddings`` (rows, hidden) beside
``input_ids`` (ids >= vocab_size select its rows), the UNet's ``encoder_hidden_states`` has a dynamic
``context_length`` axis (77 x chunks, up to ``shape_range.max_prompt_tokens`` / 75 chunks), and the "prompt" record
says how hosts build the context. Format 1 directories still load: their engines take one 77-token chunk of plain
token ids, so prompts of up to 75 tokens run as before (with the A1111 syntax, which works on the encoder's
output), and longer prompts or embeddings are refused with a message to re-export.

Format 4 (SDXL): ``model`` gains ``text_encoder_2`` (OpenCLIP bigG beside ViT-L, or null), ``default_size``
(generate's default height/width), ``zeros_for_empty_prompt`` (diffusers' force_zeros_for_empty_prompt) and, in
``unet``, ``transformer_depth_levels``, ``adm_in_channels``, ``time_id_embed_dim``; ``text_encoder`` gains
``final_norm`` and ``projection_dim``. For SDXL families the text encoder has a second output ``text_embeds``
(rows, pooled width), and its ``extra_embeddings`` rows are as wide as the context (clip_l | clip_g columns, one
per encoder); the UNet takes ``text_embeds`` and ``time_ids`` (rows,
6 for the base: original size, crop top-left, target size as (h, w) pairs; 5 for the refiner: original size, crop,
aesthetic score). ``components[vae_*]["onnx"]["precision_note"]`` says why a VAE stayed fp32 in an fp16 export.
Older directories load unchanged: the new config fields default to SD 1.x/2.x behaviour.

NumPy/stdlib only: the torch-free runtime reads it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtsd.config import ModelConfig
from rtsd.errors import EngineDirError
from rtsd.export.specs import CHUNK_TOKENS, COMPONENTS, IOSpec, ShapeRange, prompt_contract

# The first format whose UNet takes ControlNet residuals; every ControlNet version check reads this one constant.
CONTROLNET_FORMAT = 5
FORMAT_VERSION = CONTROLNET_FORMAT
# 1: before long prompts and textual inversion (one 77-token chunk, token ids only) and LoRA switching;
# 2: long prompts and textual inversion, no weights map (generation works, LoRA switching asks to re-export);
# 3: LoRA weights map, before SDXL (SD 1.x/2.x directories of format 3 read exactly as before);
# 3 and 4: no ControlNet residual inputs (generation and LoRAs work, ControlNet asks to re-export).
READABLE_VERSIONS = (1, 2, 3, 4, FORMAT_VERSION)
MANIFEST_NAME = "manifest.json"


@dataclass
class Manifest:
    model: ModelConfig
    shape_range: ShapeRange
    source: dict[str, Any]
    tokenizer: dict[str, Any]
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    rtsd_version: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION
    loras: list[dict[str, Any]] = field(default_factory=list)

    def spec(self, component: str) -> IOSpec:
        return IOSpec.from_dict(component, self.components[component]["io"])

    def onnx_path(self, engine_dir: Path, component: str) -> Path:
        return Path(engine_dir) / self.components[component]["onnx"]["file"]

    def engine_record(self, component: str, backend: str) -> dict[str, Any] | None:
        return self.components[component].get("engines", {}).get(backend)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format_version": self.format_version,
            "rtsd_version": self.rtsd_version,
            "created": self.created,
            "source": self.source,
            "model": self.model.to_dict(),
            "scheduler": self.model.to_dict()["scheduler"],
            "tokenizer": self.tokenizer,
            "shape_range": self.shape_range.to_dict(),
            "prompt": prompt_contract(self.model, self.shape_range,
                                      self.spec("text_encoder") if "text_encoder" in self.components else None),
            "components": self.components,
            "loras": self.loras,
        }
        if self.format_version == 1:  # rewritten (e.g. by --rebuild) in the layout format-1 readers know
            del data["prompt"], data["shape_range"]["max_prompt_tokens"]
        return data

    def write(self, engine_dir: Path) -> Path:
        from rtsd import __version__

        self.rtsd_version = self.rtsd_version or __version__
        self.created = self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path = Path(engine_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a manifest
        return path

    @classmethod
    def read(cls, engine_dir: str | Path) -> "Manifest":
        engine_dir = Path(engine_dir)
        path = engine_dir / MANIFEST_NAME
        if not engine_dir.is_dir():
            raise EngineDirError(f"engine directory {engine_dir} does not exist; create one with "
                                 f"`rtsd export --checkpoint CKPT --output {engine_dir}`")
        if not path.is_file():
            raise EngineDirError(f"{engine_dir} has no {MANIFEST_NAME}: not an rtsd engine directory; create one with "
                                 f"`rtsd export --checkpoint CKPT --output {engine_dir}`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineDirError(f"{path} is not valid JSON ({exc}); re-export the engine directory") from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if version not in READABLE_VERSIONS:
            raise EngineDirError(f"{path} has format_version {version!r}, this rtsd reads format_version "
                                 f"{', '.join(map(str, READABLE_VERSIONS))}; re-export with this rtsd (`rtsd export`) "
                                 f"or use a matching rtsd")
        from rtsd.engine.verify import check_manifest_data

        check_manifest_data(engine_dir, data)  # types and paths, before any file the manifest names is opened
        try:
            shape_range = data["shape_range"]
            if version == 1:  # one 77-token chunk: what format-1 engines were built for
                shape_range = {**shape_range, "max_prompt_tokens": CHUNK_TOKENS}
            manifest = cls(
                model=ModelConfig.from_dict(data["model"]),
                shape_range=ShapeRange.from_dict(shape_range),
                source=data["source"], tokenizer=data["tokenizer"], components=data["components"],
                rtsd_version=data.get("rtsd_version", ""), created=data.get("created", ""), format_version=version,
                loras=list(data.get("loras", [])))
            for name in COMPONENTS:
                manifest.spec(name)
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineDirError(f"{path} is incomplete or malformed ({type(exc).__name__}: {exc}); "
                                 f"re-export the engine directory") from None
        return manifest

    def check_files(self, engine_dir: Path, backend: str | None = None) -> None:
        """Every file the manifest names must exist: one error listing all that are missing."""
        engine_dir = Path(engine_dir)
        wanted = [self.tokenizer["directory"]]
        for name, record in self.components.items():
            wanted += [record["onnx"]["file"], *record["onnx"].get("data_files", [])]
            engine = record.get("engines", {}).get(backend) if backend else None
            if engine:
                wanted.append(engine["file"])
        missing = [w for w in wanted if not (engine_dir / w).exists()]
        if missing:
            raise EngineDirError(f"{engine_dir} is missing {', '.join(missing)}; re-export it with `rtsd export`")


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
