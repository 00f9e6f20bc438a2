"""benchmarks/latency.py --quick end to end (issue 6): the report's structure and its fairness invariants.

No timing thresholds: timings depend on the machine. What is checked instead is what makes the numbers mean
something: every contender measured every stage, CPU contenders ran with the same thread count, all contenders
produced the same image from the same weights, noise and scheduler (PSNR against the PyTorch reference), and the
FLOP count behind the compute floor equals torch's own count of the same networks.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.optional import IN_CI

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokenize", "text_encoder", "text_encoder_3_chunks", "unet", "unet_231_tokens", "vae_decode")
# diffusers is a test dependency: CI must have it (tests/optional.py); elsewhere its contender is left out.
HAS_DIFFUSERS = IN_CI or importlib.util.find_spec("diffusers") is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--quick",
                           "--cache-dir", str(out / "cache"), "--json", str(out / "report.json")],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "report.json").read_text()), done.stdout


def test_every_contender_measured_every_stage(run):
    report, _ = run
    settings = report["settings"]
    expected = {"onnxruntime-cpu", "pytorch-reference"} | ({"diffusers"} if HAS_DIFFUSERS else set())
    assert expected <= set(report["contenders"])
    for name, result in report["contenders"].items():
        for stage in STAGES:
            summary = result["stages"][stage]
            assert len(summary["samples_s"]) == summary["runs"] >= settings["stage_runs"], (name, stage)
            assert 0 < summary["min_s"] <= summary["median_s"] <= summary["max_s"], (name, stage)
        assert result["end_to_end"]["runs"] == settings["runs"]
        assert result["in_loop"]["scheduler_host_per_step_s"] > 0
        assert result["memory"]["host_peak_run_mib"] > 0
        assert 0 < result["fraction_of_peak"]["unet"] and 0 < result["fraction_of_peak"]["end_to_end"]


def test_cpu_contenders_share_threads_scheduler_and_precision(run):
    report, _ = run
    threads = report["settings"]["threads"]
    assert threads >= 1 and report["settings"]["scheduler"] == "dpmpp_2m"
    for name, result in report["contenders"].items():
        assert result["settings"]["threads"] == threads, name
        assert result["settings"]["dtype"] in ("fp32", "float32"), name
    if HAS_DIFFUSERS:
        assert report["contenders"]["diffusers"]["settings"]["scheduler"] == "DPMSolverMultistepScheduler"


def test_contenders_compute_the_same_image(run):
    """Same weights, noise, prompts, scheduler and guidance: the benchmark compares equal work."""
    report, _ = run
    others = [n for n in report["contenders"] if n != "pytorch-reference"]
    assert others
    for name in others:
        assert report["contenders"][name]["psnr_vs_reference_db"] > 55, name  # fp32 everywhere: far above 55 dB


def test_ratios_floor_machine_and_export_are_reported(run):
    report, stdout = run
    pairs = {"pytorch-reference / onnxruntime-cpu"} | ({"diffusers / onnxruntime-cpu"} if HAS_DIFFUSERS else set())
    assert pairs <= set(report["speedups"])
    for ratios in report["speedups"].values():
        assert set(ratios) == {*STAGES, "end_to_end"} and all(r > 0 for r in ratios.values())
    flops, steps = report["flops_per_call"], report["settings"]["steps"]
    assert flops["end_to_end"]["total"] == (flops["text_encoder"]["total"] + steps * flops["unet"]["total"]
                                            + flops["vae_decoder"]["total"])
    assert report["peak"]["flops_per_second"] > 0
    machine = report["machine"]
    assert machine["cpu"] and machine["usable_cores"] >= 1 and {"onnxruntime", "torch"} <= set(machine["libraries"])
    export = report["exports"]["onnx-fp32"]
    assert export["seconds"] > 0 and export["cached"] is False
    step = report["scheduler_step_us"]
    assert step["rtsd_numpy"] > 0
    if HAS_DIFFUSERS:  # diffusers' step is timed exactly when diffusers is a contender
        assert step["diffusers_torch"] > 0
    else:
        assert "diffusers_torch" not in step
    for heading in ("UNet call (CFG batch)", "end to end", "speed-up", "compute floor", "settings:"):
        assert heading in stdout


def test_flop_count_equals_torch_count_of_the_reference(run):
    """The ONNX-graph count (benchmarks/flops.py) against torch's FlopCounterMode on the reference networks, with
    attention on SDPA's math path so that its two matmuls are counted too."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flops import engine_dir_flops, reference_flops

    from rtsd.export.onnx import component_module
    from rtsd.export.specs import specs_for
    from rtsd.models import load_checkpoint

    report, _ = run
    size = report["settings"]["height"]
    counted = engine_dir_flops(report["exports"]["onnx-fp32"]["path"], images=1, height=size, width=size)
    models = load_checkpoint(report["settings"]["checkpoint"])
    specs = specs_for(models.config)
    for name, rows in (("text_encoder", 2), ("unet", 2), ("vae_decoder", 1)):
        feeds = specs[name].sample_inputs(rows, size, size)
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
            component_module(models, name)(*(torch.from_numpy(feeds[t.name]) for t in specs[name].inputs))
        assert sum(counted[name].values()) == counter.get_total_flops(), name
    # the export-free count (meta device) used when only the baselines run is the same number
    on_meta = reference_flops(report["settings"]["checkpoint"], images=1, height=size, width=size)
    assert {name: sum(c.values()) for name, c in counted.items()} == {n: c["torch"] for n, c in on_meta.items()}
