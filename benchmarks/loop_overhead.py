"""What rtsd's own generation loop costs per step on a GPU, around the engines: the time to add to TensorRT's.

    python benchmarks/loop_overhead.py [--size 512] [--steps 30] [--runs 5] [--json PATH]     (needs CuPy and a GPU)

The loop runs through the real TensorRT backend (CuPy buffers, the shared activation block, CUDA-graph replay of
the UNet call, CFG + scheduler step on CuPy arrays, host noise copied in), with TensorRT's execution replaced by the
near-free stand-in of tests/tensorrt_sim.py, so what is timed is everything rtsd does per step except the networks.
Each row is the median over runs of (denoise time / steps), measured by Runtime.generate's own timings after one
warm-up generation; "graphs off" builds the backend with CUDA graphs disabled for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

SCHEDULERS = ("dpmpp_2m", "euler_a", "ddim", "unipc")


def measure(size: int, steps: int, runs: int) -> tuple[list[dict], str]:
    from rtsd.config import ModelConfig
    from rtsd.engine import tensorrt as trt_backend
    from rtsd.engine.cuda import cuda_device
    from rtsd.export.specs import ShapeRange
    from rtsd.runtime import Runtime
    from tests.tensorrt_sim import MODEL_LIKE, SimTensorRT, cuda_launcher, write_sim_engine_dir

    cupy, gpu, capability = cuda_device("loop_overhead.py")
    config, shape_range = ModelConfig("sd1"), ShapeRange(min_size=size, max_size=size, opt_size=size, max_batch=1)
    trt = SimTensorRT(config, shape_range, compute=MODEL_LIKE, launch=cuda_launcher(cupy))
    trt_backend.import_tensorrt = lambda purpose: trt  # the stand-in replaces TensorRT for this process only
    rows = []
    with tempfile.TemporaryDirectory() as engine_dir:
        write_sim_engine_dir(Path(engine_dir), config, shape_range, gpu, capability, overflow=())
        for graphs in (("unet",), ()):
            runtime = Runtime(engine_dir, backend=trt_backend.TensorRTBackend(cuda_graphs=graphs))
            for scheduler in SCHEDULERS:
                request = dict(prompt="a lighthouse", negative_prompt="blurry", steps=steps, height=size,
                               width=size, seed=0, scheduler=scheduler)
                runtime.generate(**request)  # warm-up: kernels compiled, buffers allocated, graph captured
                per_step = [runtime.generate(**request).timings["denoise"] / steps for _ in range(runs)]
                rows.append({"scheduler": scheduler, "cuda_graphs": bool(graphs),
                             "per_step_us": statistics.median(per_step) * 1e6,
                             "spread": (max(per_step) - min(per_step)) / statistics.median(per_step)})
            runtime.close()
    return rows, f"{gpu}, CuPy {cupy.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image height = width in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=30, help="scheduler steps (default 30)")
    parser.add_argument("--runs", type=int, default=5, help="timed generations per row (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    rows, device = measure(args.size, args.steps, args.runs)
    print(f"rtsd loop per step without the networks: {args.size}x{args.size}, 1 image + CFG, {args.steps} steps, "
          f"median of {args.runs} runs; {device}")
    print(f"{'scheduler':<12}{'graphs on':>14}{'graphs off':>14}")
    for scheduler in SCHEDULERS:
        on, off = (next(r for r in rows if r["scheduler"] == scheduler and r["cuda_graphs"] == g) for g in (True, False))
        print(f"{scheduler:<12}{on['per_step_us']:>11.0f} us{off['per_step_us']:>11.0f} us")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "size": args.size, "steps": args.steps, "runs": args.runs,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
