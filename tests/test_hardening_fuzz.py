"""Fuzzing the checkpoint and engine-directory readers (issue 16): random truncations, bit flips and header edits of
a tiny checkpoint and engine directory. Every case must end in an rtsd error (RtsdError) or a correct result: never
another exception, a hang (SIGALRM per case) or an unbounded allocation (growth of the peak RSS per case).

Deterministic: one seed (FUZZ_SEED); a failure names the case number and mutation, so it can be replayed.
Case counts: SAFETENSORS_CASES + PICKLE_CASES + MANIFEST_CASES + ONNX_CASES (560 in all).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest

from rtsd.errors import RtsdError

FUZZ_SEED = 16
SAFETENSORS_CASES, PICKLE_CASES, MANIFEST_CASES, ONNX_CASES = 250, 40, 170, 100
CASE_SECONDS = 20  # a hang guard, not a timing: a case that reads headers takes milliseconds
PEAK_GROWTH = 256 * 2**20  # what one case may add to the peak memory (the tiny checkpoint's header is ~100 KB)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@pytest.fixture(autouse=True)
def _private_verify_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RTSD_CACHE_DIR", str(tmp_path / "verify-cache"))


def _peak_rss() -> int:
    """The process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def _guarded(label: str):
    """Fail (naming the case) on a hang or a large allocation; RtsdError is an accepted outcome.

    The allocation guard is the growth of the process's peak RSS: free to read (tracemalloc slows header parsing
    tenfold), and any allocation sized by a hostile header field (GBs) raises it past PEAK_GROWTH."""

    def hang(signum, frame):
        raise TimeoutError(f"{label}: no answer after {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_SECONDS)
    before = _peak_rss()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    grown = _peak_rss() - before
    assert grown < PEAK_GROWTH, f"{label}: peak memory grew by {grown / 2**20:.0f} MiB"


def _outcome(label: str, read):
    """read() -> its result, or None when it raised an RtsdError; anything else fails naming the case."""
    try:
        with _guarded(label):
            return read()
    except RtsdError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), f"{label}: error is not one line: {message!r}"
        return None
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{label}: {type(exc).__name__} escaped instead of an rtsd error: {exc}"[:600])


# ------------------------------------------------------------------------------------------ safetensors


def _split_safetensors(path: Path) -> tuple[bytes, int]:
    """(8-byte length + JSON header, size of the data section)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        head = struct.pack("<Q", length) + handle.read(length)
    return head, path.stat().st_size - len(head)


def _write_sparse(path: Path, head: bytes, total: int) -> None:
    """The header, then zeros up to ``total`` bytes as a sparse file: readers of headers never touch the data."""
    with open(path, "wb") as handle:
        handle.write(head[:total])
        handle.truncate(max(total, 0))


def _edit_header(header: dict, rng: np.random.Generator) -> str:
    keys = [k for k in header if k != "__metadata__"]
    key = keys[rng.integers(len(keys))]
    entry = header[key]
    choice = int(rng.integers(12))
    junk = [None, -1, 2**70, 1.5, "x", [], {}, [[1]], [-3, 4], "F32", True]
    if choice == 0:
        entry["dtype"] = ["F33", "", 7, None, "U64", "F8_E4M3"][rng.integers(6)]
    elif choice == 1:
        entry["shape"] = junk[rng.integers(len(junk))]
    elif choice == 2:
        entry["shape"] = [int(d) * 2 for d in entry["shape"]] or [2]
    elif choice == 3:
        entry["data_offsets"] = junk[rng.integers(len(junk))]
    elif choice == 4:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [end, begin]
    elif choice == 5:
        entry["data_offsets"] = [0, 2**62]
    elif choice == 6:
        del entry[["dtype", "shape", "data_offsets"][rng.integers(3)]]
    elif choice == 7:
        header[key] = junk[rng.integers(len(junk))]
    elif choice == 8:
        del header[key]
    elif choice == 9:
        header["model.diffusion_model." + "x" * int(rng.integers(1, 300))] = dict(entry)
    elif choice == 10:
        header["__metadata__"] = {"format": junk[rng.integers(len(junk))]}
    else:
        for k in keys[: int(rng.integers(1, len(keys)))]:
            header.pop(k)
    return f"edit {choice} of '{key}'"


def _check_correct(checkpoint, header: dict, label: str) -> None:
    """A checkpoint that opened must report exactly the shapes and sizes its (mutated) header declares."""
    from rtsd.checkpoint import summarize

    for key, shape in checkpoint.shapes.items():
        entry = header[key]
        begin, end = entry["data_offsets"]
        assert tuple(entry["shape"]) == shape or math.prod(entry["shape"]) == math.prod(shape), label
        assert end - begin == math.prod(shape) * ITEMSIZE.get(entry["dtype"], 1), label
    info = summarize(checkpoint)
    assert info["family"] in ("sd1", "sd2") and info["tensors"] == len(checkpoint.shapes), label


def test_fuzz_safetensors_checkpoints(tiny_checkpoint, tmp_path):
    from rtsd.checkpoint import open_checkpoint, summarize

    head, data_size = _split_safetensors(tiny_checkpoint)
    rng = np.random.default_rng(FUZZ_SEED)
    path = tmp_path / "fuzz.safetensors"
    opened = 0
    for case in range(SAFETENSORS_CASES):
        kind = case % 3
        mutated, total, header = bytearray(head), len(head) + data_size, None
        if kind == 0:
            total = int(rng.integers(0, len(head) + data_size))
            what = f"truncated to {total} bytes"
        elif kind == 1:
            positions = rng.integers(0, len(head), size=int(rng.integers(1, 9)))
            for position in positions:
                mutated[position] ^= 1 << int(rng.integers(8))
            what = f"bits flipped at {sorted(int(p) for p in positions)}"
        else:
            header = json.loads(head[8:])
            what = _edit_header(header, rng)
            raw = json.dumps(header).encode()
            if rng.random() < 0.2:  # and sometimes a header-length field that lies
                mutated = bytearray(struct.pack("<Q", int(rng.integers(0, 2**63))) + raw)
                what += ", header length rewritten"
            else:
                mutated = bytearray(struct.pack("<Q", len(raw)) + raw)
            total = len(mutated) + data_size
        _write_sparse(path, bytes(mutated), total)
        label = f"safetensors case {case} ({what})"
        checkpoint = _outcome(label, lambda: open_checkpoint(path))
        if checkpoint is not None:
            opened += 1
            if header is None:
                header = json.loads(bytes(mutated[8:8 + struct.unpack("<Q", mutated[:8])[0]]))
            _outcome(label, lambda: _check_correct(checkpoint, header, label))
    # Not every case is refused: flips inside a key's spelling and harmless edits still open correctly.
    assert 0 < opened < SAFETENSORS_CASES
    assert summarize(open_checkpoint(tiny_checkpoint))["family"] == "sd1"


def test_fuzz_pickle_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    from rtsd.checkpoint import MODEL_PREFIXES, open_checkpoint

    state = {"model.diffusion_model.conv_in.weight": torch.zeros(8, 4, 3, 3),
             "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(16, 8)}
    original = tmp_path / "original.ckpt"
    torch.save({"state_dict": state}, original)
    data = original.read_bytes()
    rng = np.random.default_rng(FUZZ_SEED)
    path = tmp_path / "fuzz.ckpt"
    for case in range(PICKLE_CASES):
        mutated = bytearray(data)
        if case % 2:
            mutated = mutated[: int(rng.integers(0, len(data)))]
            what = f"truncated to {len(mutated)} bytes"
        else:
            positions = rng.integers(0, len(data), size=int(rng.integers(1, 9)))
            for position in positions:
                mutated[position] ^= 1 << int(rng.integers(8))
            what = f"bits flipped at {sorted(int(p) for p in positions)}"
        path.write_bytes(bytes(mutated))
        checkpoint = _outcome(f"pickle case {case} ({what})", lambda: open_checkpoint(path))
        if checkpoint is not None:  # a flip inside a key name or a value still loads: only model tensors come out
            assert checkpoint.shapes and all(k.startswith(MODEL_PREFIXES) for k in checkpoint.shapes), what
            assert all(isinstance(d, int) for shape in checkpoint.shapes.values() for d in shape), what


# ---------------------------------------------------------------------------------------- engine dirs


def _paths(data, prefix=()):
    """Every (path of keys, value) in a JSON document."""
    yield prefix, data
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _paths(value, (*prefix, index))


def _edit_manifest(data: dict, rng: np.random.Generator) -> str:
    paths = [p for p, _ in _paths(data) if p]
    target = paths[rng.integers(len(paths))]
    parent = data
    for key in target[:-1]:
        parent = parent[key]
    junk = [None, -1, 0, 2**70, 1e308, "", "../../etc/passwd", "/abs/path", "x" * 5000, [], {}, [1, "a"], True,
            "sd3", "unet.onnx"]
    if rng.random() < 0.3 and isinstance(parent, dict):
        del parent[target[-1]]
        return f"deleted {'.'.join(map(str, target))}"
    parent[target[-1]] = junk[rng.integers(len(junk))]
    return f"set {'.'.join(map(str, target))} = {parent[target[-1]]!r:.40}"


def test_fuzz_engine_dir_manifests(tiny_engine_dir, tmp_path):
    from rtsd.engine.verify import verify_engine_dir
    from rtsd.export.manifest import Manifest

    engine_dir = Path(shutil.copytree(tiny_engine_dir, tmp_path / "engines"))
    original = (engine_dir / "manifest.json").read_bytes()
    rng = np.random.default_rng(FUZZ_SEED)

    def load():
        manifest = Manifest.read(engine_dir)
        manifest.check_files(engine_dir, backend="onnxruntime")
        verify_engine_dir(engine_dir, manifest, "onnxruntime")
        return manifest

    accepted = 0
    for case in range(MANIFEST_CASES):
        kind = case % 3
        if kind == 0:
            mutated = original[: int(rng.integers(0, len(original)))]
            what = f"truncated to {len(mutated)} bytes"
        elif kind == 1:
            buffer = bytearray(original)
            positions = rng.integers(0, len(original), size=int(rng.integers(1, 9)))
            for position in positions:
                buffer[position] ^= 1 << int(rng.integers(8))
            mutated, what = bytes(buffer), f"bits flipped at {sorted(int(p) for p in positions)}"
        else:
            data = json.loads(original)
            what = _edit_manifest(data, rng)
            mutated = json.dumps(data).encode()
        (engine_dir / "manifest.json").write_bytes(mutated)
        manifest = _outcome(f"manifest case {case} ({what})", load)
        if manifest is not None:
            accepted += 1
            # Accepted means usable: every file it names is inside the directory and the components are all there.
            for name in manifest.components:
                assert engine_dir.resolve() in manifest.onnx_path(engine_dir, name).resolve().parents, what
    assert accepted < MANIFEST_CASES
    (engine_dir / "manifest.json").write_bytes(original)
    load()


def test_fuzz_onnx_headers(tiny_engine_dir, tmp_path):
    from rtsd.engine.onnx_header import OnnxHeaderError, read_io

    data = (tiny_engine_dir / "vae_decoder.onnx").read_bytes()
    expected = read_io(tiny_engine_dir / "vae_decoder.onnx")
    rng = np.random.default_rng(FUZZ_SEED)
    path = tmp_path / "fuzz.onnx"
    refused = 0
    for case in range(ONNX_CASES):
        buffer = bytearray(data)
        if case % 2:
            buffer = buffer[: int(rng.integers(0, len(data)))]
            what = f"truncated to {len(buffer)} bytes"
        else:
            # Flips where the structure lives: the graph's first fields and its I/O declarations near the end.
            region = [int(rng.integers(0, 4096)), len(data) - 1 - int(rng.integers(0, 4096))]
            positions = [region[i % 2] for i in range(int(rng.integers(1, 9)))]
            for position in positions:
                buffer[position] ^= 1 << int(rng.integers(8))
            what = f"bits flipped at {sorted(positions)}"
        path.write_bytes(bytes(buffer))
        try:
            with _guarded(f"onnx case {case} ({what})"):
                inputs, outputs = read_io(path)
        except OnnxHeaderError:
            refused += 1
            continue
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"onnx case {case} ({what}): {type(exc).__name__}: {exc}"[:600])
        assert all(isinstance(d.name, str) and isinstance(d.shape, tuple) for d in inputs + outputs), what
    assert 0 < refused < ONNX_CASES
    assert read_io(tiny_engine_dir / "vae_decoder.onnx") == expected
