"""What rtsd's own generation loop costs per step on a GPU, around the engines: the time to add to TensorRT's.

    python benchmarks/loop_overhead.py [--size 512] [--steps 30] [--runs 5] [--unet-ms 5] [--json PATH]  (CuPy + GPU)

The loop runs through the real TensorRT backend (CuPy buffers, the shared activation block, CUDA-graph replay of
the UNet call, CFG + scheduler step on CuPy arrays, host noise copied in), with TensorRT's execution replaced by the
near-free stand-in of tests/tensorrt_sim.py, so what is timed is everything rtsd does per step except the networks.
Each figure is the median over runs of (denoise time / steps), measured by Runtime.generate's own timings after one
warm-up generation; "graphs off" builds the backend with CUDA graphs disabled for comparison, and "plain step"
runs the CFG combine and scheduler step as one CuPy kernel per array operation instead of the one fused kernel
(rtsd/engine/fused_step.py) the runtime uses.

The host never waits for the GPU inside the loop, so this cost should hide behind a UNet call that takes longer.
The last column checks that: the stand-in UNet also keeps the GPU busy for ``--unet-ms`` (a spin kernel, its
duration measured with CUDA events); a per-step time equal to that means the loop's own cost is fully overlapped.
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

SCHEDULERS = ("ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm")


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


def gpu_busy_unet(cupy, milliseconds: float):
    """The stand-in UNet plus a one-thread spin kernel of about ``milliseconds`` on the same stream, and its
    measured duration in ms."""
    from tests.tensorrt_sim import MODEL_LIKE

    spin = cupy.RawKernel(_SPIN, "spin")
    cycles = cupy.int64(milliseconds * 1e-3 * cupy.cuda.Device().attributes["ClockRate"] * 1e3)

    def compute(xp, inputs, outputs, overflow=False):
        MODEL_LIKE["unet"](xp, inputs, outputs)
        spin((1,), (1,), (cycles,))

    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    spin((1,), (1,), (cycles,))  # compile + clocks up
    start.record()
    for _ in range(10):
        spin((1,), (1,), (cycles,))
    end.record()
    end.synchronize()
    return compute, cupy.cuda.get_elapsed_time(start, end) / 10


def measure(size: int, steps: int, runs: int, unet_ms: float) -> tuple[list[dict], str, float]:
    from rtsd import runtime as runtime_module
    from rtsd.config import ModelConfig
    from rtsd.engine import fused_step
    from rtsd.engine import tensorrt as trt_backend
    from rtsd.engine.cuda import cuda_device
    from rtsd.export.specs import ShapeRange
    from rtsd.runtime import Runtime
    from tests.tensorrt_sim import MODEL_LIKE, SimTensorRT, cuda_launcher, write_sim_engine_dir

    cupy, gpu, capability = cuda_device("loop_overhead.py")
    config, shape_range = ModelConfig("sd1"), ShapeRange(min_size=size, max_size=size, opt_size=size, max_batch=1)
    busy_unet, busy_ms = gpu_busy_unet(cupy, unet_ms)
    setups = {"graphs on": (("unet",), MODEL_LIKE, True), "plain step": (("unet",), MODEL_LIKE, False),
              "graphs off": ((), MODEL_LIKE, True), "busy UNet": (("unet",), {**MODEL_LIKE, "unet": busy_unet}, True)}
    rows = []
    for setup, (graphs, compute, fused) in setups.items():
        # "plain step": the CFG combine and scheduler step as one CuPy kernel per array operation (before fusion).
        runtime_module.device_step = lambda sampler, xp, fused=fused: fused_step.device_step(sampler, xp, fused)
        trt = SimTensorRT(config, shape_range, compute=compute, launch=cuda_launcher(cupy))
        trt_backend.import_tensorrt = lambda purpose: trt  # the stand-in replaces TensorRT in this process only
        with tempfile.TemporaryDirectory() as engine_dir:
            write_sim_engine_dir(Path(engine_dir), config, shape_range, gpu, capability, overflow=())
            runtime = Runtime(engine_dir, backend=trt_backend.TensorRTBackend(cuda_graphs=graphs))
            for scheduler in SCHEDULERS:
                request = dict(prompt="a lighthouse", negative_prompt="blurry", steps=steps, height=size,
                               width=size, seed=0, scheduler=scheduler)
                runtime.generate(**request)  # warm-up: kernels compiled, buffers allocated, graph captured
                per_step = [runtime.generate(**request).timings["denoise"] / steps for _ in range(runs)]
                rows.append({"scheduler": scheduler, "setup": setup, "per_step_us": statistics.median(per_step) * 1e6,
                             "spread": (max(per_step) - min(per_step)) / statistics.median(per_step)})
            runtime.close()
    return rows, f"{gpu}, CuPy {cupy.__version__}", busy_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image height = width in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=30, help="scheduler steps (default 30)")
    parser.add_argument("--runs", type=int, default=5, help="timed generations per row (default 5)")
    parser.add_argument("--unet-ms", type=float, default=5.0, help="GPU time of the busy stand-in UNet (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    rows, device, busy_ms = measure(args.size, args.steps, args.runs, args.unet_ms)
    setups = ("graphs on", "plain step", "graphs off", "busy UNet")
    print(f"rtsd loop per step: {args.size}x{args.size}, 1 image + CFG, {args.steps} steps, median of {args.runs} "
          f"runs; {device}; the busy UNet keeps the GPU busy {busy_ms:.2f} ms per call")
    print(f"{'scheduler':<12}" + "".join(f"{s:>14}" for s in setups))
    for scheduler in SCHEDULERS:
        cells = [next(r for r in rows if r["scheduler"] == scheduler and r["setup"] == s) for s in setups]
        print(f"{scheduler:<12}" + "".join(f"{c['per_step_us']:>11.0f} us" for c in cells))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "size": args.size, "steps": args.steps, "runs": args.runs,
                                         "busy_unet_ms": busy_ms, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
