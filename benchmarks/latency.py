"""Per-stage and end-to-end latency of rtsd's engines beside the PyTorch reference and diffusers, on the same weights.

    python benchmarks/latency.py                      full-size SD 1.5 (synthetic weights), every backend here
    python benchmarks/latency.py --checkpoint sd.safetensors --json result.json
    python benchmarks/latency.py --quick --json q.json   tiny preset, under a minute on 2 CPU cores (smoke test)
    python benchmarks/latency.py --controlnets --json cn.json   per-step cost with 0/1/2 ControlNets and the cost of
                                                     the UNet's residual inputs on the plain path (controlnet_cost.py)

Contenders: rtsd on TensorRT, ONNX Runtime CUDA and/or ONNX Runtime CPU (whatever runs here), and two baselines:
the PyTorch reference in the same loop and a diffusers StableDiffusionPipeline (benchmarks/baselines.py).
All use the same scheduler, steps, size, guidance, prompts and initial noise; CPU contenders the same thread count.

Engines are exported once per checkpoint and cached (~/.cache/rtsd/bench/<sha256[:16]>/); the export time is
reported on its own. Every contender runs in a fresh worker process, one after the other, so each one's load and
peak memory are its own and none competes with another for the cores. See benchmarks/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS.parent), str(BENCHMARKS)]

import machine

RTSD_CONTENDERS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
BASELINES = ("pytorch-reference", "diffusers")
STAGES = ("tokenize", "text_encoder", "text_encoder_3_chunks", "unet", "unet_231_tokens", "vae_decode")
# Which export each rtsd contender runs: TensorRT builds fp16 plans from the fp32 ONNX; ONNX Runtime CUDA gets fp16
# ONNX (its fair GPU precision), the CPU fp32.
EXPORT_KIND = {"tensorrt": "tensorrt", "onnxruntime-cuda": "onnx-fp16", "onnxruntime-cpu": "onnx-fp32"}
EXPORT_ARGS = {"tensorrt": ("fp32", "tensorrt"), "onnx-fp16": ("fp16", "onnx"), "onnx-fp32": ("fp32", "onnx")}
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"
# What users pay for long prompts: a prompt of 3 chunks (151..225 tokens) beside PROMPT's one, and the UNet call
# with the 231-token context it gives beside the 77-token one.
LONG_PROMPT = ", ".join([PROMPT] * 9)


@dataclass
class Plan:
    """Everything a run does, decided once in the parent and handed to each worker as JSON."""

    device: str
    checkpoint: str
    preset: str | None
    height: int
    width: int
    steps: int
    guidance: float
    scheduler: str
    threads: int
    rounds: int
    runs: int
    stage_runs: int
    warmup: int
    contenders: list[str]
    seed: int = 0
    ort_config: dict[str, str] = field(default_factory=dict)
    engine_dirs: dict[str, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows of the text-encoder and UNet calls: one image, doubled by classifier-free guidance."""
        return 2 if self.guidance > 1.0 else 1


# ---------------------------------------------------------------------------------------------- the parent process

def main(argv: list[str] | None = None) -> int:
    if "--controlnets" in (sys.argv[1:] if argv is None else argv):  # per-step ControlNet cost: its own module
        import controlnet_cost

        return controlnet_cost.main(argv)
    args = _parse(argv)
    if args.worker:
        return _worker(args)
    load_at_start = list(os.getloadavg())
    cache = Path(args.cache_dir).expanduser()
    plan = _plan(args, cache)
    say(f"rtsd latency benchmark: {plan.device}, {plan.height}x{plan.width}, {plan.steps} steps, "
        f"{plan.scheduler}, CFG {plan.guidance}, {plan.threads} threads; contenders {', '.join(plan.contenders)}")
    sha = _sha256(plan.checkpoint)
    exports = {}
    for contender in plan.contenders:
        if contender in EXPORT_KIND:
            path, info = _ensure_engines(plan, EXPORT_KIND[contender], cache / sha[:16])
            plan.engine_dirs[contender], exports[EXPORT_KIND[contender]] = str(path), info
    flops = _flops(plan)
    with tempfile.TemporaryDirectory(prefix="rtsd-bench-") as work:
        work = Path(work)
        (work / "plan.json").write_text(json.dumps(asdict(plan)))
        peak = _spawn(plan, work, "peak")
        rounds = []
        for index in range(plan.rounds):  # contenders take turns, so slow drifts in machine load hit all alike
            say(f"round {index + 1}/{plan.rounds}")
            rounds.append({name: _spawn(plan, work, "contender", name) for name in plan.contenders})
        results = {name: _merge([r[name] for r in rounds], plan) for name in plan.contenders}
        images = {name: np.load(work / f"{name}.npy") for name in results if (work / f"{name}.npy").exists()}
    report = {
        "format": "rtsd-latency/1",
        "command": " ".join(shlex.quote(a) for a in [f"python benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
        "machine": {**machine.describe(), "load_average_at_start": load_at_start}, "peak": peak,
        "settings": {**{k: v for k, v in asdict(plan).items() if k != "engine_dirs"}, "checkpoint_sha256": sha,
                     "images_per_call": 1, "prompt": PROMPT, "negative_prompt": NEGATIVE,
                     "initial_noise": f"numpy default_rng({plan.seed}) standard normal, passed to every contender"},
        "exports": exports, "flops_per_call": flops,
        "scheduler_step_us": _scheduler_step_us(plan),
        "contenders": results,
    }
    _derive(report, images)
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        say(f"wrote {args.json}")
    return 0


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a .safetensors/.ckpt/diffusers folder (default: synthetic sd15 weights)")
    p.add_argument("--quick", action="store_true", help="tiny preset, few steps and runs: under a minute on 2 cores")
    p.add_argument("--size", type=int, help="height = width in pixels (default 512 on GPU, 256 on CPU)")
    p.add_argument("--steps", type=int, help="scheduler steps (default 30 on GPU, 4 on CPU)")
    p.add_argument("--rounds", type=int, help="times each contender is started, in turns (default 3 on CPU, else 1)")
    p.add_argument("--runs", type=int, help="timed end-to-end runs per round, after the warm-up")
    p.add_argument("--stage-runs", type=int, help="timed calls per stage and round, after the warm-up")
    p.add_argument("--warmup", type=int, help="untimed runs before each measurement (default 1 on CPU, 2 on GPU)")
    p.add_argument("--threads", type=int, help="CPU threads for every CPU contender (default: usable cores)")
    p.add_argument("--scheduler", default="dpmpp_2m", help="scheduler for all contenders (default dpmpp_2m)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--contenders", help=f"comma list from {', '.join(RTSD_CONTENDERS + BASELINES)} "
                                        "(default: every one that runs here)")
    p.add_argument("--ort-config", action="append", default=[], metavar="KEY=VALUE",
                   help="experiment: ONNX Runtime session config entry for the rtsd ONNX Runtime contenders, e.g. "
                        "session.intra_op.allow_spinning=0 (repeatable; default: rtsd as shipped)")
    p.add_argument("--cache-dir", default=os.environ.get("RTSD_BENCH_CACHE", "~/.cache/rtsd/bench"),
                   help="where synthetic checkpoints and exported engines are kept (default ~/.cache/rtsd/bench)")
    p.add_argument("--json", help="also write the full results (machine description included) here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: export | peak | contender
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _plan(args, cache: Path) -> Plan:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    size = args.size or (128 if args.quick else 512 if gpu else 256)
    steps = args.steps or (3 if args.quick else 30 if gpu else 4)
    preset = None if args.checkpoint else "tiny" if args.quick else "sd15"
    checkpoint = args.checkpoint or str(_synthetic_checkpoint(cache, preset))
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise SystemExit(f"error: checkpoint {args.checkpoint} does not exist; pass an existing file or folder")
    contenders = args.contenders.split(",") if args.contenders else _available_contenders(device)
    unknown = sorted(set(contenders) - set(RTSD_CONTENDERS + BASELINES))
    if unknown:
        raise SystemExit(f"error: unknown contender(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(RTSD_CONTENDERS + BASELINES)}")
    contenders = runnable_contenders(contenders)
    return Plan(device=device, checkpoint=checkpoint, preset=preset, height=size, width=size, steps=steps,
                guidance=args.guidance, scheduler=args.scheduler, threads=args.threads or machine.describe()["usable_cores"],
                rounds=args.rounds or (3 if not (gpu or args.quick) else 1),
                runs=args.runs or (2 if args.quick else 10 if gpu else 1),
                stage_runs=args.stage_runs or (3 if args.quick else 20 if gpu else 2),
                warmup=args.warmup if args.warmup is not None else (2 if gpu else 1), contenders=contenders,
                ort_config=dict(entry.split("=", 1) for entry in args.ort_config))


# What each contender's worker imports beyond rtsd's runtime, and the install command that brings it.
CONTENDER_NEEDS = {
    "diffusers": (("diffusers", "transformers", "accelerate", "torch"), "pip install 'rtsd[dev]'"),
    "pytorch-reference": (("torch",), "pip install 'rtsd[export]'"),
    "onnxruntime-cpu": (("onnxruntime",), "pip install 'rtsd[onnx]'"),
    "onnxruntime-cuda": (("onnxruntime",), "pip install onnxruntime-gpu"),
    "tensorrt": (("tensorrt", "cupy"), "pip install 'rtsd[tensorrt]'"),
}


def runnable_contenders(contenders: list[str]) -> list[str]:
    """Drop a contender whose packages are missing, with one line naming them and the install command (its worker
    would otherwise die with an ImportError traceback halfway through the run)."""
    kept = []
    for name in contenders:
        modules, command = CONTENDER_NEEDS.get(name, ((), ""))
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            say(f"skipping {name}: {', '.join(missing)} not installed ({command})")
        else:
            kept.append(name)
    return kept


def _available_contenders(device: str) -> list[str]:
    """TensorRT and ONNX Runtime CUDA on a GPU (ONNX Runtime CPU only when asked: minutes per image there);
    ONNX Runtime CPU otherwise; then the baselines that are installed."""
    from rtsd.errors import RtsdError

    found = []
    if device == "cuda":
        try:
            from rtsd.engine import get_backend

            get_backend("tensorrt")
            found.append("tensorrt")
        except (RtsdError, ImportError):
            pass
    try:
        import onnxruntime

        cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        found.append("onnxruntime-cuda" if device == "cuda" and cuda else "onnxruntime-cpu")
    except ImportError:
        pass
    found.append("pytorch-reference")
    if importlib.util.find_spec("diffusers") is not None:
        found.append("diffusers")
    return found


def _synthetic_checkpoint(cache: Path, preset: str) -> Path:
    path = cache / "checkpoints" / f"{preset}-seed0.safetensors"
    if not path.exists():
        from rtsd.models.synthetic import write_checkpoint

        say(f"writing the synthetic {preset} checkpoint to {path} (once) ...")
        write_checkpoint(path, preset=preset, seed=0)
    return path


def _sha256(checkpoint: str) -> str:
    from rtsd.checkpoint import open_checkpoint

    return open_checkpoint(checkpoint).sha256()


def _shape_range(plan: Plan):
    from rtsd.export.specs import ShapeRange

    size = plan.height
    return ShapeRange(min_size=min(256, size), opt_size=size, max_size=max(1024, size), max_batch=4)


def _ensure_engines(plan: Plan, kind: str, cache: Path) -> tuple[Path, dict]:
    """The cached engine directory of this checkpoint, export kind and shape range; exported (timed) if missing."""
    r = _shape_range(plan)
    path = cache / f"{kind}-{r.min_size}-{r.opt_size}-{r.max_size}px-b{r.max_batch}"
    record = path.with_name(path.name + ".export.json")
    if (path / "manifest.json").exists() and record.exists():
        return path, {**json.loads(record.read_text()), "cached": True, "path": str(path)}
    say(f"exporting {kind} engines to {path} (once per checkpoint; timed) ...")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rtsd-export-") as work:
        (Path(work) / "plan.json").write_text(json.dumps(asdict(plan)))
        info = _spawn(plan, Path(work), "export", f"{kind}:{path}")
    record.write_text(json.dumps(info))
    return path, {**info, "cached": False, "path": str(path)}


def _flops(plan: Plan) -> dict | None:
    """FLOPs per call counted from an exported ONNX graph (any export of the checkpoint: the networks are the same),
    or by torch on the reference networks when only the baselines run."""
    from flops import engine_dir_flops, reference_flops

    if plan.engine_dirs:
        per_call = engine_dir_flops(next(iter(plan.engine_dirs.values())), 1, plan.height, plan.width,
                                    guidance=plan.rows == 2)
    else:
        per_call = reference_flops(plan.checkpoint, 1, plan.height, plan.width, guidance=plan.rows == 2)
    flops = {name: {**counts, "total": sum(counts.values())} for name, counts in per_call.items()}
    flops["end_to_end"] = {"total": flops["text_encoder"]["total"] + plan.steps * flops["unet"]["total"]
                           + flops["vae_decoder"]["total"], "how": f"text encoder + {plan.steps} UNet calls + VAE decode"}
    return flops


def _scheduler_step_us(plan: Plan) -> dict:
    """Host cost of one scheduler step alone, rtsd (NumPy) vs diffusers (torch), at this run's latent shape, with
    benchmarks/scheduler_step.py's timing functions; the in-loop figures come from each contender's own runs."""
    import scheduler_step

    shape = (1, 4, plan.height // 8, plan.width // 8)
    rng = np.random.default_rng(1)
    model_output = (rng.standard_normal(shape, dtype=np.float32) * 0.5).astype(np.float32)
    x0 = rng.standard_normal(shape, dtype=np.float32)
    repeats = max(200 // plan.steps, 5)
    result = {"scheduler": plan.scheduler, "shape": list(shape), "calls": repeats * plan.steps,
              "rtsd_numpy": statistics.median(scheduler_step.time_rtsd(plan.scheduler, plan.steps, repeats,
                                                                       model_output, x0))}
    if "diffusers" in plan.contenders:
        import torch

        torch.set_num_threads(plan.threads)
        result["diffusers_torch"] = statistics.median(
            scheduler_step.time_diffusers(plan.scheduler, plan.steps, repeats, model_output, x0))
    return result


def _spawn(plan: Plan, work: Path, kind: str, name: str | None = None) -> dict:
    """Run one worker in a fresh process with the plan's thread count; return what it wrote."""
    out = work / f"{kind}-{(name or 'x').replace('/', '_').replace(':', '_')[-60:]}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads), "MKL_NUM_THREADS": str(plan.threads),
           "RTSD_ORT_THREADS": str(plan.threads), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--work", str(work),
               "--name", name or "", "--json", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, check=False)
    say(f"{kind} {name or ''}: {time.perf_counter() - start:.1f} s")
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"error: the {kind} worker{f' for {name}' if name else ''} failed (exit {done.returncode}); "
                         f"its output is above")
    return json.loads(out.read_text())


def _derive(report: dict, images: dict[str, np.ndarray]) -> None:
    """Fractions of the compute floor, ratios against each baseline, and image agreement with the reference."""
    from rtsd.export.parity import psnr

    peak, flops = report["peak"]["flops_per_second"], report["flops_per_call"]
    stage_flops = {"text_encoder": "text_encoder", "unet": "unet", "vae_decode": "vae_decoder"}
    for name, result in report["contenders"].items():
        if flops:
            fractions = {stage: flops[c]["total"] / peak / result["stages"][stage]["median_s"]
                         for stage, c in stage_flops.items()}
            fractions["end_to_end"] = flops["end_to_end"]["total"] / peak / result["end_to_end"]["median_s"]
            result["fraction_of_peak"] = fractions
        if "pytorch-reference" in images and name in images and name != "pytorch-reference":
            ours, ref = images[name].astype(np.float64) / 255, images["pytorch-reference"].astype(np.float64) / 255
            result["psnr_vs_reference_db"] = float(psnr(ours, ref))
    ratios = {}
    for ours in (c for c in report["contenders"] if c in RTSD_CONTENDERS):
        for base in (c for c in report["contenders"] if c in BASELINES):
            a, b = report["contenders"][ours], report["contenders"][base]
            ratios[f"{base} / {ours}"] = {
                **{s: b["stages"][s]["median_s"] / a["stages"][s]["median_s"] for s in STAGES},
                "end_to_end": b["end_to_end"]["median_s"] / a["end_to_end"]["median_s"]}
    report["speedups"] = ratios  # > 1: the rtsd contender is that many times faster than the baseline


# ---------------------------------------------------------------------------------------------- the table

def render(report: dict) -> str:
    """The report as text: setup, one column per contender, then the floor, the speed-ups and the settings."""
    s, m, peak, results = report["settings"], report["machine"], report["peak"], report["contenders"]
    names = list(results)
    width = max(18, *(len(n) + 2 for n in names))

    def row(label: str, cells, cell_width: int = width) -> str:
        return f"{label:<26}" + "".join(f"{c:>{cell_width}}" for c in cells)

    def loads(values) -> str:
        return "/".join(f"{x:.1f}" for x in values)

    lines = [
        (f"machine: {m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB, GPU {m['gpu'] or 'none'}; load "
         f"average (1/5/15 min) {loads(m['load_average_at_start'])} at start, "
         f"{loads(m['load_average_1_5_15min'])} at end"),
        f"peak: {peak['flops_per_second'] / 1e9:.1f} GFLOP/s measured ({peak['how']})",
        (f"run: {s['preset'] or Path(s['checkpoint']).name}, {s['height']}x{s['width']}, {s['steps']} steps "
         f"{s['scheduler']}, CFG {s['guidance']}, {s['threads']} threads; median over {s['rounds']} round(s) x "
         f"{s['runs']} end-to-end / {s['stage_runs']} stage runs, each after {s['warmup']} warm-up"),
        f"command: {report['command']}", "", row("stage", names)]
    lines.append("-" * len(lines[-1]))
    labels = {"tokenize": "tokenizer (2 prompts)", "text_encoder": "text encoder", "unet": "UNet call (CFG batch)",
              "text_encoder_3_chunks": "text encoder, 3 chunks", "unet_231_tokens": "UNet call, 231-token context",
              "vae_decode": "VAE decode", "end_to_end": f"end to end ({s['steps']} steps)"}
    lines += [row(labels[stage], (_cell(results[n]["stages"][stage]) for n in names)) for stage in STAGES]
    lines += [
        row("scheduler host / step", (f"{results[n]['in_loop']['scheduler_host_per_step_s'] * 1e6:.0f} us"
                                      for n in names)),
        row(labels["end_to_end"], (_cell(results[n]["end_to_end"]) for n in names)),
        row("  per step (derived)", (f"{results[n]['per_step_derived_s'] * 1e3:.0f} ms" for n in names)),
        row("  30 steps (estimated)", (f"{results[n]['estimated_total_s']['30']:.1f} s" for n in names)),
        row("peak host memory (run)", (f"{results[n]['memory']['host_peak_run_mib']:.0f} MiB" for n in names))]
    if s["device"] == "cpu":
        lines.append(row("CPU share, end to end", (f"{(results[n]['end_to_end']['cpu_share'] or 0) * 100:.0f}%"
                                                   for n in names)))
    if any(results[n]["memory"].get("device_mib") is not None for n in names):
        lines.append(row("device memory", (f"{results[n]['memory'].get('device_mib') or 0:.0f} MiB" for n in names)))
    if report["flops_per_call"]:
        f = report["flops_per_call"]
        lines += ["", "compute floor (FLOPs from the exported ONNX graphs / measured peak) and each result's fraction:",
                  f"{'stage':<26}{'GFLOP':>10}{'floor':>12}" + row("", names)[26:]]
        for stage, comp in (("text_encoder", "text_encoder"), ("unet", "unet"), ("vae_decode", "vae_decoder"),
                            ("end_to_end", "end_to_end")):
            total = f[comp]["total"]
            lines.append(f"{labels[stage]:<26}{total / 1e9:>10.1f}{total / peak['flops_per_second'] * 1e3:>9.0f} ms"
                         + row("", (f"{results[n]['fraction_of_peak'][stage] * 100:.0f}%" for n in names))[26:])
    if report["speedups"]:
        pairs = list(report["speedups"])
        pair_width = max(len(p) for p in pairs) + 2
        lines += ["", "speed-up (baseline time / rtsd time; > 1 means rtsd is faster):", row("stage", pairs, pair_width)]
        lines += [row(labels[stage], (f"{report['speedups'][p][stage]:.2f}x" for p in pairs), pair_width)
                  for stage in (*STAGES, "end_to_end")]
    st = report["scheduler_step_us"]
    lines += ["", f"scheduler step alone ({st['scheduler']}, {'x'.join(map(str, st['shape']))} float32, median of "
                  f"{st['calls']} calls, benchmarks/scheduler_step.py): rtsd NumPy {st['rtsd_numpy']:.0f} us"
                  + (f", diffusers torch {st['diffusers_torch']:.0f} us" if "diffusers_torch" in st else "")]
    agree = [f"{n} {r['psnr_vs_reference_db']:.1f} dB" for n, r in results.items() if "psnr_vs_reference_db" in r]
    if agree:
        lines.append("same images: PSNR vs the PyTorch reference's image: " + ", ".join(agree))
    for kind, e in report["exports"].items():
        lines.append(f"export {kind}: {e['seconds']:.0f} s{' (cached from an earlier run)' if e['cached'] else ''}")
    lines.append("settings:")
    lines += [f"  {n}: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items() if v is not None)
              for n, r in results.items()]
    return "\n".join(lines)


def _cell(summary: dict) -> str:
    median = summary["median_s"]
    spread = (summary["max_s"] - summary["min_s"]) / 2 / median * 100 if median else 0.0
    value = f"{median * 1e3:.1f}" if median < 10 else f"{median * 1e3:.0f}"
    return f"{value} ms ±{spread:.0f}%"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- worker processes

def _worker(args) -> int:
    work = Path(args.work)
    plan = Plan(**json.loads((work / "plan.json").read_text()))
    kinds = {"export": _export_worker, "peak": lambda p, n, w: machine.measure_peak_flops(p.device, p.threads),
             "contender": _contender_worker}
    Path(args.json).write_text(json.dumps(kinds[args.worker](plan, args.name, work)))
    return 0


def _export_worker(plan: Plan, name: str, work: Path) -> dict:
    from rtsd.export.pipeline import export

    kind, path = name.split(":", 1)
    precision, backend = EXPORT_ARGS[kind]
    start = time.perf_counter()
    export(plan.checkpoint, path, shape_range=_shape_range(plan), precision=precision, backend=backend,
           overwrite=True, progress=say)
    return {"seconds": time.perf_counter() - start, "precision": precision, "backend": backend,
            "shape_range": _shape_range(plan).to_dict(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def _contender_worker(plan: Plan, name: str, work: Path) -> dict:
    """Load one contender, time each stage on fixed inputs, then whole generations; raw samples back to the parent."""
    from baselines import load_contender

    from rtsd.export.specs import specs_for

    memory, device_before = machine.PeakMemory(), machine.device_memory_used_mib()
    start = time.perf_counter()
    contender = load_contender(name, checkpoint=plan.checkpoint, device=plan.device, scheduler=plan.scheduler,
                               threads=plan.threads, engine_dir=plan.engine_dirs.get(name), work=work,
                               ort_config=plan.ort_config if name.startswith("onnxruntime") else None)
    load_seconds = time.perf_counter() - start
    load_peak, after_load = memory.peak_mib(), memory.current_mib()
    memory.reset()  # from here on: what running costs, not the loader's transient copies

    h, w = plan.height, plan.width
    specs = specs_for(contender.config)
    calls = contender.stage_calls([NEGATIVE, PROMPT][2 - plan.rows:], specs["unet"].sample_inputs(plan.rows, h, w, 1),
                                  specs["vae_decoder"].sample_inputs(1, h, w, 2), [NEGATIVE, LONG_PROMPT][2 - plan.rows:],
                                  specs["unet"].sample_inputs(plan.rows, h, w, 1, chunks=3)["encoder_hidden_states"])
    stages = {stage: _time(calls[stage], plan.warmup, plan.stage_runs * (20 if stage == "tokenize" else 1))
              for stage in STAGES}
    latents = np.random.default_rng(plan.seed).standard_normal((1, contender.config.latent_channels, h // 8, w // 8),
                                                               dtype=np.float32)
    outputs = []
    generate = lambda: outputs.append(contender.generate(PROMPT, NEGATIVE, latents, plan.steps, plan.guidance, h, w))
    end_to_end = _time(generate, plan.warmup, plan.runs)
    timed = [timings for _, timings in outputs[plan.warmup:]]
    np.save(work / f"{name}.npy", outputs[-1][0])
    device_after = machine.device_memory_used_mib()
    result = {
        "settings": contender.settings(plan.threads), "load_seconds": load_seconds, "stages": stages,
        "end_to_end": end_to_end, "in_loop": {key: [t[key] for t in timed] for key in timed[0] if key != "total"},
        "memory": {"host_peak_load_mib": load_peak, "host_after_load_mib": after_load,
                   "host_peak_run_mib": memory.peak_mib(), "peak_reset_worked": memory.resettable,
                   "device_mib": None if device_before is None else device_after - device_before},
    }
    if plan.device == "cuda" and name in BASELINES:
        import torch

        result["memory"]["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    contender.close()
    return result


def _time(fn, warmup: int, runs: int) -> dict[str, list[float]]:
    """Wall-clock seconds of each call, and the process CPU seconds (all threads) it used."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        before, start = os.times(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - start)
        after = os.times()
        cpu.append(after.user + after.system - before.user - before.system)
    return {"wall_s": wall, "cpu_s": cpu}


def _merge(rounds: list[dict], plan: Plan) -> dict:
    """One contender's rounds -> medians and spreads over all samples, and the figures derived from them."""
    def summary(key_path):
        wall = [x for r in rounds for x in key_path(r)["wall_s"]]
        cpu = [x for r in rounds for x in key_path(r)["cpu_s"]]
        shares = [c / w / plan.threads for c, w in zip(cpu, wall) if w > 0]
        return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall), "runs": len(wall),
                "samples_s": wall, "cpu_share": statistics.median(shares) if shares else None, "cpu_shares": shares}

    stages = {stage: summary(lambda r, s=stage: r["stages"][s]) for stage in STAGES}
    end_to_end = summary(lambda r: r["end_to_end"])
    fixed = sum(stages[s]["median_s"] for s in ("tokenize", "text_encoder", "vae_decode"))
    per_step = (end_to_end["median_s"] - fixed) / plan.steps
    memory = {key: max(r["memory"][key] for r in rounds) if isinstance(rounds[0]["memory"][key], (int, float))
              and not isinstance(rounds[0]["memory"][key], bool) else rounds[0]["memory"][key]
              for key in rounds[0]["memory"]}
    return {"settings": rounds[0]["settings"], "rounds": len(rounds),
            "load_seconds": statistics.median(r["load_seconds"] for r in rounds),
            "stages": stages, "end_to_end": end_to_end, "per_step_derived_s": per_step,
            "estimated_total_s": {str(n): fixed + n * per_step for n in (30, 50)},
            "in_loop": {key + "_s": statistics.median(x for r in rounds for x in r["in_loop"][key])
                        for key in rounds[0]["in_loop"]},
            "memory": memory}


if __name__ == "__main__":
    raise SystemExit(main())
