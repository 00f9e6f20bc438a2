"""Is an engine directory what its manifest says? Checked when a Runtime loads it, before any engine runs.

1. Paths: every file the manifest names stays inside the engine directory (no absolute paths, no ``..``), so a
   tampered manifest cannot make the runtime load or hash files from elsewhere. Always on (``check_paths``).
2. Contract: the manifest's I/O spec matches its model family (``specs_for(manifest.model)``); for ONNX Runtime,
   each ONNX file's declared inputs and outputs (read from its protobuf header, weights skipped) match that spec and
   their fixed dims lie inside the manifest's shape range. Always on; costs milliseconds (``check_contract``).
3. Hashes: every file the chosen backend reads that has a sha256 in the manifest (ONNX files and their external
   weight files for ONNX Runtime, plans for TensorRT, tokenizer files for all) must hash to it. A file that was verified once is remembered by (device, inode, size, mtime, ctime) in the
   user's cache (``verified_files_cache``), so later loads cost a stat per file; the exporter records the files it
   hashes while writing, so a directory exported on this machine is never hashed again at load. Opt out with
   ``Runtime(..., verify=False)`` / ``rtsd generate --no-verify`` (``check_hashes``).

Why the user cache and not the engine directory: engine directories are often read-only for the serving user, and
whoever can rewrite a file in the engine directory could also rewrite a "verified" record beside it. The ctime
(which no user can set) catches a file rewritten and then ``touch``-ed back to its old mtime.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

from rtsd.errors import EngineDirError

CACHE_ENV = "RTSD_CACHE_DIR"
CACHE_FILE = "verified-files.json"
CACHE_VERSION = 1
MAX_CACHE_ENTRIES = 4096  # oldest records are dropped beyond this; a dropped file is simply hashed again
REEXPORT = "re-export the engine directory with `rtsd export`"


def verify_engine_dir(engine_dir: str | Path, manifest, backend: str | None, *, hashes: bool = True) -> None:
    """Checks 2 and 3 for the files ``backend`` will load (paths are checked by ``Manifest.read``).

    ONNX Runtime loads the ONNX files, TensorRT the plans (tied to their ONNX by ``onnx_sha256`` in staleness.py);
    a backend of another name (a stand-in, a custom object) gets the family check and the tokenizer's hashes."""
    engine_dir = Path(engine_dir)
    if hashes:
        check_hashes(engine_dir, manifest, backend)
    check_contract(engine_dir, manifest, onnx_files=backend == "onnxruntime")


# ---------------------------------------------------------------------------------------------------------- paths


def manifest_paths(data: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(where in the manifest, relative path) for every file or directory a manifest names."""
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict) and "directory" in tokenizer:
        yield "tokenizer.directory", tokenizer["directory"]
    components = data.get("components")
    for name, record in (components.items() if isinstance(components, dict) else ()):
        onnx = record.get("onnx") if isinstance(record, dict) else None
        if isinstance(onnx, dict):
            if "file" in onnx:
                yield f"{name}.onnx.file", onnx["file"]
            for i, data_file in enumerate(onnx.get("data_files") or ()):
                yield f"{name}.onnx.data_files[{i}]", data_file
        engines = record.get("engines") if isinstance(record, dict) else None
        for backend, engine in (engines.items() if isinstance(engines, dict) else ()):
            if isinstance(engine, dict) and "file" in engine:
                yield f"{name}.engines.{backend}.file", engine["file"]
            fallback = engine.get("fallback") if isinstance(engine, dict) else None
            if isinstance(fallback, dict) and "file" in fallback:
                yield f"{name}.engines.{backend}.fallback.file", fallback["file"]


def check_manifest_data(engine_dir: str | Path, data: dict[str, Any]) -> None:
    """The file-naming parts of a parsed manifest have the right types, and every path stays inside ``engine_dir``."""
    where = f"{engine_dir}/manifest.json"
    tokenizer, components = data.get("tokenizer"), data.get("components")
    if not isinstance(tokenizer, dict) or not isinstance(components, dict) or not isinstance(data.get("source"), dict):
        raise EngineDirError(f"{where} is incomplete or malformed: 'tokenizer', 'components' and 'source' must be "
                             f"objects; {REEXPORT}")
    _expect(where, "tokenizer.sha256", tokenizer.get("sha256", {}), dict, str)
    for name, record in components.items():
        if not isinstance(record, dict) or not isinstance(record.get("onnx"), dict):
            raise EngineDirError(f"{where} is incomplete or malformed: components.{name} must be an object with an "
                                 f"'onnx' object; {REEXPORT}")
        onnx = record["onnx"]
        _expect(where, f"{name}.onnx.sha256", onnx.get("sha256"), str)
        _expect(where, f"{name}.onnx.data_files", onnx.get("data_files", []), list, str)
        _expect(where, f"{name}.onnx.data_sha256", onnx.get("data_sha256", {}), dict, str)
        _expect(where, f"{name}.engines", record.get("engines", {}), dict, dict)
        for backend, engine in record.get("engines", {}).items():
            if engine.get("sha256") is not None:
                _expect(where, f"{name}.engines.{backend}.sha256", engine["sha256"], str)
    check_paths(engine_dir, data)


def _expect(where: str, field: str, value, kind: type, item: type | None = None) -> None:
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if not isinstance(value, kind) or (item is not None and not all(isinstance(v, item) for v in items)):
        shape = f"{kind.__name__} of {item.__name__}" if item else kind.__name__
        raise EngineDirError(f"{where} is incomplete or malformed: {field} must be a {shape}, got {value!r:.60}; "
                             f"{REEXPORT}")


def check_paths(engine_dir: str | Path, data: dict[str, Any]) -> None:
    """Refuse a manifest naming a path outside ``engine_dir`` (absolute, ``..``, or a symlink leading out)."""
    root = Path(engine_dir).resolve()
    for where, value in manifest_paths(data):
        if not isinstance(value, str) or not value:
            raise EngineDirError(f"{engine_dir}/manifest.json: {where} must be a file name, got {value!r}; {REEXPORT}")
        parts = PurePosixPath(value.replace("\\", "/")).parts
        if (PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or PureWindowsPath(value).drive
                or ".." in parts):
            raise EngineDirError(f"{engine_dir}/manifest.json: {where} '{value}' points outside the engine directory; "
                                 f"refusing to load it ({REEXPORT})")
        target = (root / value).resolve()
        if target != root and root not in target.parents:
            raise EngineDirError(f"{engine_dir}/manifest.json: {where} '{value}' leads outside the engine directory "
                                 f"(symlink to {target}); refusing to load it ({REEXPORT})")


# ------------------------------------------------------------------------------------------------------- contract


def check_contract(engine_dir: Path, manifest, onnx_files: bool = True) -> None:
    """Manifest spec == the spec of the manifest's model; with ``onnx_files``, also == the ONNX files' declarations,
    whose fixed dims lie inside the shape range."""
    from rtsd.engine.onnx_header import OnnxHeaderError, read_io
    from rtsd.export.specs import COMPONENTS, specs_for

    from rtsd.export.controlnet import controlnet_components
    from rtsd.export.specs import controlnet_spec

    expected = _expected_specs(manifest, specs_for(manifest.model, manifest.shape_range))
    controlnets = controlnet_components(manifest)
    expected.update({c: controlnet_spec(manifest.model, c) for c in controlnets})
    for name in [c for c in COMPONENTS if c in manifest.components] + controlnets:
        spec = manifest.spec(name)
        if name in expected and _io(spec) != _io(expected[name]):
            raise EngineDirError(f"{engine_dir}: the manifest's {name} I/O {_describe(_io(spec))} is not what a "
                                 f"{manifest.model.family} model has ({_describe(_io(expected[name]))}); the manifest "
                                 f"was edited or mixed from two exports: {REEXPORT}")
        if not onnx_files:
            continue
        path = manifest.onnx_path(engine_dir, name)
        try:
            inputs, outputs = read_io(path)
        except OnnxHeaderError as exc:
            raise EngineDirError(f"{path} is corrupted (not a readable ONNX model: {exc}); {REEXPORT}") from None
        except OSError as exc:
            raise EngineDirError(f"{path} cannot be read ({exc}); {REEXPORT}") from None
        declared = {d.name: d for d in inputs + outputs}
        for tensor in spec.inputs + spec.outputs:
            problem = _mismatch(tensor, declared.get(tensor.name), manifest.shape_range, spec)
            if problem:
                raise EngineDirError(f"{path} does not match the manifest: {tensor.name} {problem}; the file comes "
                                     f"from another export or the manifest was edited: {REEXPORT}")


def _expected_specs(manifest, current: dict) -> dict:
    """What the manifest's format version declares: format 1 predates long prompts and textual inversion (a text
    encoder of token ids only, a UNet context of exactly one 77-token chunk); formats before 4 have a UNet without
    ControlNet residual inputs."""
    from rtsd.export.manifest import CONTROLNET_FORMAT
    from rtsd.export.specs import specs_for

    if manifest.format_version < CONTROLNET_FORMAT:  # no ControlNet residual inputs yet
        current = {**current, "unet": specs_for(manifest.model, manifest.shape_range, control_residuals=False)["unet"]}
    if manifest.format_version != 1:
        return current
    import dataclasses

    from rtsd.export.specs import CONTEXT_AXIS

    text, unet = current["text_encoder"], current["unet"]
    chunk = text.inputs[0].shape[1]
    return {**current,
            "text_encoder": dataclasses.replace(text, inputs=tuple(t for t in text.inputs if t.name == "input_ids")),
            "unet": dataclasses.replace(unet, inputs=tuple(
                dataclasses.replace(t, shape=tuple(chunk if d == CONTEXT_AXIS else d for d in t.shape))
                for t in unet.inputs))}


def _io(spec) -> list:
    return [(t.name, t.dtype, tuple(t.shape)) for t in spec.inputs + spec.outputs]


def _describe(io: list) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, _, shape in io)


def _mismatch(tensor, declared, shape_range, spec) -> str | None:
    if declared is None:
        return "is not declared by the ONNX graph"
    if declared.dtype != tensor.dtype:
        return f"is {declared.dtype} in the ONNX file, {tensor.dtype} in the manifest"
    if len(declared.shape) != len(tensor.shape):
        return f"has shape {list(declared.shape)} in the ONNX file, {list(tensor.shape)} in the manifest"
    bounds = _symbol_bounds(shape_range, spec)
    for axis, (want, got) in enumerate(zip(tensor.shape, declared.shape)):
        if isinstance(want, int) and got != want:
            return f"axis {axis} is {got} in the ONNX file, {want} in the manifest"
        if isinstance(want, str) and isinstance(got, int):
            low, high = bounds.get(want, (got, got))
            if not low <= got <= high:
                return (f"axis {axis} ({want}) is fixed to {got} in the ONNX file, outside the manifest's shape "
                        f"range {low}..{high}")
    return None


def _symbol_bounds(shape_range, spec) -> dict[str, tuple[int, int]]:
    r, f = shape_range, spec.downsample
    return {"batch": (r.min_batch, r.max_batch * spec.batch_factor), "height": (r.min_size, r.max_size),
            "width": (r.min_size, r.max_size), "latent_height": (r.min_size // f, r.max_size // f),
            "latent_width": (r.min_size // f, r.max_size // f)}


# --------------------------------------------------------------------------------------------------------- hashes


def hashed_files(manifest, backend: str | None) -> list[tuple[str, str]]:
    """(relative path, sha256) of every file with a recorded hash that ``backend`` will read."""
    files: list[tuple[str, str]] = []
    for name, record in manifest.components.items():
        onnx = record["onnx"]
        if backend == "onnxruntime":
            files.append((onnx["file"], onnx["sha256"]))
            files += sorted((onnx.get("data_sha256") or {}).items())
        engine = (record.get("engines") or {}).get(backend) if backend else None
        for plan in (engine, (engine or {}).get("fallback")):
            if isinstance(plan, dict) and plan.get("sha256"):
                files.append((plan["file"], plan["sha256"]))
    directory = manifest.tokenizer.get("directory", "tokenizer")
    files += sorted((f"{directory}/{file}", digest) for file, digest in (manifest.tokenizer.get("sha256") or {}).items())
    return files


def check_hashes(engine_dir: Path, manifest, backend: str | None) -> None:
    """Hash each file not already remembered as verified; one error naming every file that does not match."""
    from rtsd.export.manifest import sha256_file

    cache = _load_cache()
    bad, changed = [], False
    for relative, expected in hashed_files(manifest, backend):
        path = engine_dir / relative
        try:
            stat = path.stat()
        except OSError:
            continue  # a missing file is Manifest.check_files' error, with the whole list
        key, identity = f"{stat.st_dev}:{stat.st_ino}", [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, expected]
        if cache.get(key) == identity:
            continue
        if sha256_file(path) != expected:
            bad.append(relative)
            continue
        cache.pop(key, None)
        cache[key] = identity
        changed = True
    if bad:
        raise EngineDirError(f"{engine_dir}: {', '.join(bad)} corrupted or replaced: sha256 does not match the "
                             f"manifest; {REEXPORT} (or load unverified with --no-verify / verify=False)")
    if changed:
        _save_cache(cache)


def remember_verified(digests: dict[Path, str]) -> None:
    """Record files whose sha256 the caller has just computed (the exporter), so the first load needs no hashing."""
    cache = _load_cache()
    for path, digest in digests.items():
        stat = Path(path).stat()
        key = f"{stat.st_dev}:{stat.st_ino}"
        cache.pop(key, None)
        cache[key] = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, digest]
    _save_cache(cache)


def verified_files_cache() -> Path:
    """$RTSD_CACHE_DIR, else $XDG_CACHE_HOME/rtsd, else ~/.cache/rtsd; the file in it remembers verified files."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rtsd" / CACHE_FILE


def _load_cache() -> dict[str, list]:
    try:
        data = json.loads(verified_files_cache().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return dict(data["files"])


def _save_cache(files: dict[str, list]) -> None:
    """Atomic replace; best effort: an unwritable cache only means hashing again next time."""
    path = verified_files_cache()
    entries = list(files.items())[-MAX_CACHE_ENTRIES:]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": CACHE_VERSION, "files": dict(entries)}, handle)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
