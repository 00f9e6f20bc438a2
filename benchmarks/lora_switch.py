"""Time of switching a LoRA set on loaded engines vs a fresh export, and the merge's own share.

    flock /work/locks/bigmem python benchmarks/lora_switch.py --preset sd15 --rank 32 --out benchmarks/results/...

Full-size SD 1.5 synthetic checkpoint (random weights, real layout), fp32 ONNX, ONNX Runtime on the CPU. The LoRA set
is what kohya trains by default on SD 1.5 at rank 32: every attention/feed-forward/proj Linear of the UNet's
transformer blocks and every Linear of the text encoder (fp16 file). Measured:
  export     rtsd export of the checkpoint, without the parity check (a user's export also runs that check, so
             the ratio below is conservative)
  switch     Runtime.set_loras({A: 0.8}), then {A: 0.5, B: 0.3}, then {} (back to base), each broken down into
             read (LoRA files), deltas (keys matched, up @ down products), merge (base + deltas, layout), apply (ORT sessions rebuilt)
Prints a table and writes the raw figures (plus the machine) as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def kohya_lora(path: Path, table, rank: int, seed: int) -> int:
    """A kohya-layout LoRA over the UNet transformer Linears and all text-encoder Linears; returns module count."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    state = {}
    for name, target in table.items():
        component, rest = name.split(".", 1)
        if component == "unet" and (".attentions." not in rest or len(target.shape) != 2 or "norm" in rest):
            continue
        prefix = ("lora_unet_" if component == "unet" else "lora_te_") + rest.replace(".", "_")
        out, inp = target.shape
        state[f"{prefix}.lora_down.weight"] = (rng.standard_normal((rank, inp)) / inp).astype(np.float16)
        state[f"{prefix}.lora_up.weight"] = (rng.standard_normal((out, rank)) * 0.1).astype(np.float16)
        state[f"{prefix}.alpha"] = np.array(rank / 2, np.float16)
    save_file(state, str(path))
    return len(state) // 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write the raw figures as JSON here")
    args = parser.parse_args()

    from machine import describe
    from rtsd.adapters.lora_keys import lora_table
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange
    from rtsd.models.synthetic import PRESETS, checkpoint_shapes, write_checkpoint
    from rtsd.runtime import Runtime

    work = args.workdir or Path(tempfile.mkdtemp(prefix="rtsd-lora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": describe(), "command": " ".join(sys.argv), "preset": args.preset, "rank": args.rank}
    try:
        checkpoint = write_checkpoint(work / f"{args.preset}.safetensors", args.preset)
        table = lora_table(checkpoint_shapes(args.preset), PRESETS[args.preset].unet.num_res_blocks)
        a, b = work / "style.safetensors", work / "detail.safetensors"
        results["lora_modules"] = kohya_lora(a, table, args.rank, 1)
        kohya_lora(b, table, args.rank, 2)
        results["lora_file_mb"] = round(a.stat().st_size / 2**20, 1)

        start = time.perf_counter()
        engine_dir = export(checkpoint, work / "engines", shape_range=ShapeRange(min_size=256, max_size=512,
                            opt_size=512, max_batch=1), check=False, progress=print)
        results["export_s"] = time.perf_counter() - start

        start = time.perf_counter()
        runtime = Runtime(engine_dir, backend="onnxruntime")
        results["load_s"] = time.perf_counter() - start
        switches = {}
        for label, loras in (("A:0.8", {a: 0.8}), ("A:0.5+B:0.3", {a: 0.5, b: 0.3}), ("base", {})):
            start = time.perf_counter()
            runtime.set_loras(loras)
            switches[label] = {"total_s": time.perf_counter() - start, **runtime._loras.timings}
        results["switches"] = switches
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.preset}, rank {args.rank} ({results['lora_modules']} modules, {results['lora_file_mb']} MB "
          f"per file), ONNX Runtime CPU, {results['machine'].get('cpu')}")
    print(f"fresh export (no parity check): {results['export_s']:.1f} s; engine load: {results['load_s']:.1f} s")
    for label, t in switches.items():
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in t.items() if k != "total_s")
        share = t.get("merge", 0.0) / t["total_s"]
        print(f"switch to {label:12s}: {t['total_s']:6.2f} s = {t['total_s'] / results['export_s']:.1%} of an "
              f"export ({parts}; merge share {share:.0%})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
