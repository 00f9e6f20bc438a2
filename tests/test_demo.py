"""`rtsd demo`, the README's first command: checkpoint -> checked ONNX engines -> an image, from nothing."""

from __future__ import annotations

import json
import subprocess

import numpy as np
from PIL import Image

from rtsd.cli import main
from tests.optional import require_console_script


def test_demo_writes_a_checked_engine_dir_and_an_image(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "demo finished in" in out and "rtsd export --checkpoint" in out
    manifest = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    image = Image.open(tmp_path / "demo.png")
    assert image.size == (256, 256) and image.mode == "RGB"
    parameters = json.loads(image.text["parameters"])
    assert parameters["steps"] == 3 and parameters["seed"] == 0 and parameters["backend"] == "onnxruntime"
    assert np.asarray(image).std() > 1  # an image, not a flat fill


def test_the_console_script_runs():
    done = subprocess.run([require_console_script("rtsd"), "demo", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--workdir" in done.stdout
