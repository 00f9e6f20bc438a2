"""ControlNet cost per denoising step: 0 / 1 / 2 ControlNets, and what the residual inputs cost the plain path.

    python benchmarks/latency.py --controlnets [--preset tiny] [--size 256] [--steps 8] [--rounds 5] [--json out.json]
    python benchmarks/controlnet_cost.py ...      (the same, run directly)

Rows (one process, ONNX Runtime on the CPU unless onnxruntime-gpu sees a GPU; contenders take turns every round):

* ``unet_plain_variant``: one UNet call (CFG rows) of a UNet exported WITHOUT residual inputs (what a separate
  text-to-image-only UNet would cost);
* ``unet_zero_residuals``: the same call on the UNet rtsd exports (13 residual inputs), fed zeros, as the plain path
  does. The difference of these two is the price of one UNet graph for every ControlNet combination;
* ``step_0_controlnets`` / ``step_1_controlnet`` / ``step_2_controlnets``: Runtime.generate's ``unet_per_step``
  (UNet + ControlNet engines + residual sums + CFG + scheduler step) with none, one and two ControlNets.

Synthetic random weights (rtsd.models.synthetic) in the real layouts; timings only, the images are noise.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS.parent), str(BENCHMARKS)]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--controlnets", action="store_true", help=argparse.SUPPRESS)  # when called through latency.py
    p.add_argument("--preset", default="tiny", help="synthetic preset (tiny, tiny-sd2, small: SD 1.5's UNet at half "
                   "width; sd15 needs GBs of RAM)")
    p.add_argument("--size", type=int, default=256, help="height = width in pixels")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=10, help="timed UNet calls per round for the residual-input rows")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="also write the raw timings here")
    args, _ = p.parse_known_args(argv)
    return args


def _preset(name: str):
    """A synthetic preset name, or "small": SD 1.5's UNet structure at half its width (160 channels) with the tiny
    text encoder and VAE: big enough that the UNet's convolutions, not per-call overheads, dominate its time."""
    if name != "small":
        return name
    from rtsd.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

    return ModelConfig(family="sd1", unet=UNetConfig(model_channels=160, context_dim=128), vae=VAEConfig(ch=32),
                       text_encoder=TextEncoderConfig(hidden_size=128, num_layers=12, num_heads=2,
                                                      intermediate_size=512))


def run(args) -> dict:
    import machine
    from rtsd.engine.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeEngine
    from rtsd.export.onnx import component_module, export_module
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange, specs_for
    from rtsd.models import load_checkpoint
    from rtsd.models.synthetic import write_checkpoint, write_controlnet
    from rtsd.runtime import Runtime

    size = args.size
    shape_range = ShapeRange(min_size=min(128, size), opt_size=size, max_size=size, max_batch=1)
    with tempfile.TemporaryDirectory(prefix="rtsd-cn-bench-") as work:
        work = Path(work)
        checkpoint = write_checkpoint(work / "model.safetensors", _preset(args.preset), seed=0)
        files = [write_controlnet(work / f"cn{k}.safetensors", _preset(args.preset), seed=k + 1) for k in range(2)]
        t0 = time.perf_counter()
        engines = export(checkpoint, work / "engines", shape_range=shape_range, progress=None,
                         controlnets=[("a", files[0]), ("b", files[1])])
        export_s = time.perf_counter() - t0
        config = load_checkpoint(checkpoint).config
        plain_spec = specs_for(config, shape_range, control_residuals=False)["unet"]
        export_module(component_module(load_checkpoint(checkpoint), "unet"), plain_spec, work / "plain_unet.onnx",
                      shape_range)
        backend = OnnxRuntimeBackend(providers=None, threads=args.threads)
        runtime = Runtime(engines, backend=backend)
        with_residuals = runtime.engines["unet"]
        plain = OnnxRuntimeEngine("unet", work / "plain_unet.onnx", plain_spec, backend.providers, backend.threads,
                                  backend.session_config)
        feeds = with_residuals.spec.sample_inputs(rows=2, height=size, width=size, seed=0)
        zero_feeds = {k: (np.zeros_like(v) if "residual" in k else v) for k, v in feeds.items()}
        plain_feeds = {t.name: feeds[t.name] for t in plain_spec.inputs}
        control = np.random.default_rng(0).random((size, size, 3), dtype=np.float32)
        requests = {"step_0_controlnets": None, "step_1_controlnet": [("a", control, 1.0)],
                    "step_2_controlnets": [("a", control, 1.0), ("b", control, 0.5)]}
        raw: dict[str, list[float]] = {k: [] for k in ("unet_plain_variant", "unet_zero_residuals", *requests)}
        # warm-up: every session once
        plain.infer(plain_feeds), with_residuals.infer(zero_feeds)
        runtime.generate("warm", steps=2, height=size, width=size, seed=0, controlnets=requests["step_2_controlnets"])
        for _ in range(args.rounds):
            for _ in range(args.calls):  # alternate call by call: load drifts hit both alike
                for name, engine, f in (("unet_plain_variant", plain, plain_feeds),
                                        ("unet_zero_residuals", with_residuals, zero_feeds)):
                    t0 = time.perf_counter()
                    engine.infer(f)
                    raw[name].append(time.perf_counter() - t0)
            for name, controlnets in requests.items():
                result = runtime.generate("a house by a lake", steps=args.steps, height=size, width=size, seed=1,
                                          scheduler="euler", controlnets=controlnets)
                raw[name].append(result.timings["unet_per_step"])
        runtime.close()
    medians = {k: statistics.median(v) for k, v in raw.items()}
    return {
        "format": "rtsd-controlnet-cost/1",
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "machine": machine.describe(),
        "settings": {"preset": args.preset, "size": size, "steps": args.steps, "rounds": args.rounds,
                     "calls": args.calls, "threads": args.threads, "backend": "onnxruntime",
                     "providers": backend.providers, "unet_rows": 2, "export_s": export_s},
        "median_s": medians,
        "residual_inputs_overhead": medians["unet_zero_residuals"] / medians["unet_plain_variant"] - 1.0,
        "raw_s": raw,
    }


def render(report: dict) -> str:
    m = report["median_s"]
    s = report["settings"]
    lines = [f"ControlNet cost: {s['preset']} {s['size']}x{s['size']}, {s['steps']} steps, CFG (2 UNet rows), "
             f"{s['backend']} {s['providers'][0]}, {s['rounds']} rounds",
             f"{'row':28} {'median ms':>10}  {'vs reference row':>18}"]
    base_step = m["step_0_controlnets"]
    for name, ref in (("unet_plain_variant", None), ("unet_zero_residuals", "unet_plain_variant"),
                      ("step_0_controlnets", None), ("step_1_controlnet", "step_0_controlnets"),
                      ("step_2_controlnets", "step_0_controlnets")):
        rel = f"{m[name] / m[ref]:.3f}x {ref}" if ref else ""
        lines.append(f"{name:28} {m[name] * 1e3:10.2f}  {rel}")
    lines.append(f"residual inputs on the plain path: {report['residual_inputs_overhead'] * 100:+.1f}% per UNet call "
                 f"(zeros fed vs a UNet without the inputs); one ControlNet adds "
                 f"{(m['step_1_controlnet'] / base_step - 1) * 100:.0f}% per step, two "
                 f"{(m['step_2_controlnets'] / base_step - 1) * 100:.0f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    report = run(args)
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
