"""What engine verification costs at load: first load (every file hashed) vs remembered (a stat per file).

    flock /work/locks/bigmem python benchmarks/verify_cost.py --workdir ~/.cache/rtsd/verify-bench \
        --json benchmarks/results/verify-cost.json      (full-size synthetic SD 1.5: ~11 GB RAM during export)
    python benchmarks/verify_cost.py --preset tiny --workdir /tmp/verify-tiny   (seconds; a smoke run)

Writes a synthetic checkpoint and exports it once (ONNX fp32, no parity check) into --workdir, unless --engine-dir
names an existing engine directory. Then, with the verified-files cache in a fresh temporary directory, it times
``rtsd.engine.verify.verify_engine_dir`` for the ONNX Runtime backend:

    first      cache empty: path + contract checks and sha256 of every file the manifest hashes
    remembered the same files again: path + contract checks, a stat per file, no hashing
    unhashed   verify=False: path + contract checks only

and, with --runtime, a full ``Runtime(engine_dir)`` load (ONNX Runtime sessions) with verify=False, to put the
figures in proportion. The files sit in the page cache (just written or read): "first" is hashing speed, not disk
speed; a cold disk adds its read time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd15", help="synthetic preset to export (default sd15, full size)")
    p.add_argument("--engine-dir", type=Path, help="measure this existing engine directory instead of exporting")
    p.add_argument("--workdir", type=Path, default=Path("~/.cache/rtsd/verify-bench").expanduser())
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement (default 3)")
    p.add_argument("--runtime", action="store_true", help="also time a full Runtime load without verification")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    engine_dir = args.engine_dir or _export(args.preset, args.workdir.expanduser())
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "engine_dir": str(engine_dir),
              "machine": _machine(), **measure(engine_dir, args.repeats, args.runtime)}
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def measure(engine_dir: Path, repeats: int, runtime: bool) -> dict:
    from rtsd.engine.verify import hashed_files, verify_engine_dir
    from rtsd.export.manifest import Manifest

    manifest = Manifest.read(engine_dir)
    files = hashed_files(manifest, "onnxruntime")
    sizes = {rel: (engine_dir / rel).stat().st_size for rel, _ in files}
    timings: dict[str, list[float]] = {"first": [], "remembered": [], "unhashed": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="rtsd-verify-cache-") as cache:
            os.environ["RTSD_CACHE_DIR"] = cache
            for kind, hashes in (("first", True), ("remembered", True), ("unhashed", False)):
                start = time.perf_counter()
                verify_engine_dir(engine_dir, manifest, "onnxruntime", hashes=hashes)
                timings[kind].append(time.perf_counter() - start)
    result = {"files_hashed": len(files), "bytes_hashed": sum(sizes.values()), "file_sizes": sizes,
              "seconds": timings, "best_seconds": {k: min(v) for k, v in timings.items()}}
    if runtime:
        from rtsd.runtime import Runtime

        start = time.perf_counter()
        Runtime(engine_dir, backend="onnxruntime", verify=False).close()
        result["runtime_load_unverified_seconds"] = time.perf_counter() - start
    return result


def render(report: dict) -> str:
    best = report["best_seconds"]
    gib = report["bytes_hashed"] / 2**30
    lines = [f"engine directory {report['engine_dir']}: {report['files_hashed']} hashed files, {gib:.2f} GiB",
             f"  first load (hash every file)     {best['first']:8.3f} s   ({gib / best['first']:.2f} GiB/s)",
             f"  remembered (stat per file)       {best['remembered'] * 1e3:8.2f} ms",
             f"  verify=False (paths + contract)  {best['unhashed'] * 1e3:8.2f} ms",
             f"  (best of {len(report['seconds']['first'])}; all: " +
             ", ".join(f"{k} {[round(v, 4) for v in vals]}" for k, vals in report["seconds"].items()) + ")"]
    if "runtime_load_unverified_seconds" in report:
        lines.append(f"  Runtime load, ONNX Runtime, verify=False: {report['runtime_load_unverified_seconds']:.1f} s")
    machine = report["machine"]
    lines.append(f"machine: {machine.get('cpu')}, {machine.get('usable_cores')} usable cores, "
                 f"{machine.get('memory_gib')} GiB, load {machine.get('load_average_1_5_15min')}")
    return "\n".join(lines)


def _export(preset: str, workdir: Path) -> Path:
    """A synthetic checkpoint exported to ONNX fp32 once; reused while its manifest exists."""
    engine_dir = workdir / f"{preset}-engines"
    if (engine_dir / "manifest.json").is_file():
        return engine_dir
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange
    from rtsd.models.synthetic import write_checkpoint

    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / f"{preset}-seed0.safetensors"
    if not checkpoint.exists():
        write_checkpoint(checkpoint, preset=preset, seed=0)
    size_range = ShapeRange() if preset.startswith("sd") else ShapeRange(min_size=128, max_size=256, opt_size=128)
    export(checkpoint, engine_dir, shape_range=size_range, check=False)
    return engine_dir


def _machine() -> dict:
    try:
        import machine

        return machine.describe()
    except Exception as exc:  # the description is context, not the measurement
        return {"error": str(exc)}


if __name__ == "__main__":
    sys.exit(main())
