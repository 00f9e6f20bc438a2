"""Cost of one scheduler ``step`` on a 4x64x64 float32 latent: rtsd beside diffusers, on the CPU or on a GPU.

    python benchmarks/scheduler_step.py [--steps 30] [--repeats 20] [--json PATH]
    python benchmarks/scheduler_step.py --device cuda     rtsd on CuPy arrays, diffusers on torch CUDA tensors

On the CPU rtsd steps NumPy arrays and diffusers torch CPU tensors. With ``--device cuda`` both keep the latents on
the GPU (as rtsd's TensorRT loop does) and each timed call ends with a device synchronize, so the figure is launch
overhead plus kernel time; rtsd's stochastic noise is drawn on the host and copied in, as the runtime does.

Each repeat builds a fresh scheduler (not timed) and times every ``step`` call of a full loop on its own; the
table shows the median over all calls. The model output is a fixed array, so only scheduler arithmetic is timed.
Stochastic samplers: rtsd receives its noise as an argument (drawing it is timed separately in the last row),
while diffusers draws noise inside ``step`` (DDIM takes it as ``variance_noise``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtsd.schedulers import available, create, scheduler_class  # noqa: E402

SHAPE = (1, 4, 64, 64)
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
# Settings rtsd implements where diffusers' class defaults differ, and the diffusers switch for one algorithm.
RTSD_OPTIONS = {"pndm": {"skip_prk_steps": True}}
DIFFUSERS_CONFIG = {"pndm": {"skip_prk_steps": True}, "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++"}}


def time_rtsd(name: str, steps: int, repeats: int, model_output: np.ndarray, x0: np.ndarray,
              device: str = "cpu") -> list[float]:
    if device == "cuda":
        import cupy

        to_device, sync = cupy.asarray, cupy.cuda.get_current_stream().synchronize
    else:
        to_device, sync = (lambda a: a), (lambda: None)
    rng = np.random.default_rng(0)
    out, start_x = to_device(model_output), to_device(x0)
    times = []
    for _ in range(repeats):
        s = create(name, steps, **SD | RTSD_OPTIONS.get(name, {}))
        x = start_x * s.init_noise_sigma
        for i in range(len(s.timesteps)):
            noise = rng.standard_normal(SHAPE, dtype=np.float32) if s.stochastic else None
            s.scale_model_input(x, i)  # untimed, as below: diffusers' Euler family logs a warning without it
            sync()
            start = time.perf_counter_ns()
            x = s.step(out, i, x, noise=None if noise is None else to_device(noise))
            sync()
            times.append((time.perf_counter_ns() - start) / 1e3)
    return times


def time_diffusers(name: str, steps: int, repeats: int, model_output: np.ndarray, x0: np.ndarray,
                   device: str = "cpu") -> list[float]:
    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()
    cls = getattr(diffusers, scheduler_class(name).diffusers_class)
    config = SD | DIFFUSERS_CONFIG.get(name, {})
    out = torch.from_numpy(model_output).to(device)
    generator = torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            sched = cls(**config)
            sched.set_timesteps(steps, device=device)
            x = torch.from_numpy(x0).to(device) * sched.init_noise_sigma
            for t in sched.timesteps:
                kwargs = {"generator": generator} if "generator" in _step_parameters(sched) else {}
                sched.scale_model_input(x, t)
                sync()
                start = time.perf_counter_ns()
                x = sched.step(out, t, x, **kwargs).prev_sample
                sync()
                times.append((time.perf_counter_ns() - start) / 1e3)
    return times


def _step_parameters(sched) -> set[str]:
    import inspect

    return set(inspect.signature(sched.step).parameters)


def time_noise(repeats: int) -> list[float]:
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        rng.standard_normal(SHAPE, dtype=np.float32)
        times.append((time.perf_counter_ns() - start) / 1e3)
    return times


def _device_name(device: str) -> str:
    if device == "cuda":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        return f"{props['name'].decode()}, CuPy {cupy.__version__}"
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="inference steps per loop (default 30)")
    parser.add_argument("--repeats", type=int, default=20, help="loops per algorithm and implementation (default 20)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: NumPy vs torch CPU; cuda: CuPy vs torch CUDA (default cpu)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    rng = np.random.default_rng(1)
    model_output = (rng.standard_normal(SHAPE, dtype=np.float32) * 0.5).astype(np.float32)
    x0 = rng.standard_normal(SHAPE, dtype=np.float32)
    try:
        import torch

        torch_info = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        torch_info = None

    rows = []
    for name in available():
        ours = statistics.median(time_rtsd(name, args.steps, args.repeats, model_output, x0, args.device))
        theirs = (
            statistics.median(time_diffusers(name, args.steps, args.repeats, model_output, x0, args.device))
            if torch_info else None
        )
        rows.append({"algorithm": name, "rtsd_us": ours, "diffusers_us": theirs})
    noise_us = statistics.median(time_noise(args.steps * args.repeats))

    where = "host cost (NumPy / torch CPU)" if args.device == "cpu" else "on the GPU (CuPy / torch CUDA, synchronized)"
    print(f"step() {where}, {'x'.join(map(str, SHAPE))} float32, {args.steps} steps x {args.repeats} loops, median us")
    print(f"{'algorithm':<14}{'rtsd':>10}{'diffusers':>12}{'diffusers/rtsd':>16}")
    for row in rows:
        theirs = row["diffusers_us"]
        ratio = f"{theirs / row['rtsd_us']:.2f}x" if theirs else "-"
        theirs_text = "-" if theirs is None else f"{theirs:.1f}"
        print(f"{row['algorithm']:<14}{row['rtsd_us']:>10.1f}{theirs_text:>12}{ratio:>16}")
    print(f"{'(noise draw)':<14}{noise_us:>10.1f}{'':>12}{'':>16}   rng.standard_normal for stochastic rtsd steps")
    print(f"numpy {np.__version__}; {torch_info or 'torch not installed'}; {_device_name(args.device)}")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "shape": SHAPE,
                    "dtype": "float32",
                    "steps": args.steps,
                    "repeats": args.repeats,
                    "unit": "microseconds (median per step call)",
                    "device": _device_name(args.device),
                    "numpy": np.__version__,
                    "torch": torch_info,
                    "rows": rows,
                    "noise_draw_us": noise_us,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
