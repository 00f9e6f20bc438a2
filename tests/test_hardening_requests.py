"""Odd and hostile requests at the Runtime and CLI boundaries (issue 16, defects 5, 6, 7, 8, 10).

Each bad request must fail before any engine runs, in one line naming the argument and the fix; the CLI exits 2
without a traceback.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import pytest

from rtsd.cli import main
from rtsd.runtime import Runtime


@pytest.fixture(autouse=True)
def _private_verify_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RTSD_CACHE_DIR", str(tmp_path / "verify-cache"))


@pytest.fixture(scope="module")
def runtime(tiny_engine_dir):
    return Runtime(tiny_engine_dir, backend="onnxruntime")


@pytest.fixture
def no_engine_runs(monkeypatch):
    """Fail the test if a generation reaches the engines: checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the request reached the engines before it was checked")

    monkeypatch.setattr(Runtime, "generate", refuse)
    monkeypatch.setattr(Runtime, "__init__", refuse)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height RGB but whose pixel data is a few bytes: a small file that decodes
    to a huge image (PIL allocates the whole image before it finds the data short)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _one_line(capsys) -> str:
    """The one error line on stderr (progress bars aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("denoising")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------- 5. tracebacks at the CLI


def test_decompression_bomb_png_is_one_line(tiny_engine_dir, tmp_path, capsys):
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)  # 900 M pixels: PIL's DecompressionBombError
    for size in (["--size", "128x128"], []):
        assert main(["generate", str(tiny_engine_dir), "p", "--image", str(bomb), "--steps", "1",
                     "-o", str(tmp_path / "out.png"), *size]) == 2
        assert "bomb.png" in _one_line(capsys)


@pytest.mark.parametrize("option", ["-o", "--json"])
def test_outputs_below_an_existing_file_are_refused_first(tiny_engine_dir, tiny_checkpoint, tmp_path, capsys,
                                                          no_engine_runs, monkeypatch, option):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected")
    if option == "-o":
        argv = ["generate", str(tiny_engine_dir), "p", "-o", str(blocker / "out.png")]
    else:
        import rtsd.export.parity

        monkeypatch.setattr(rtsd.export.parity, "check_engine_dir", lambda *a, **k: pytest.fail("parity ran"))
        argv = ["parity", str(tiny_engine_dir), "--checkpoint", str(tiny_checkpoint), "--json",
                str(blocker / "report.json")]
    assert main(argv) == 2
    assert "is a file, not a directory" in _one_line(capsys)


def test_os_errors_become_one_line(tiny_engine_dir, tmp_path, capsys, monkeypatch):
    from rtsd import cli

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out.png"))

    monkeypatch.setattr(cli, "save_png", full_disk)
    assert main(["generate", str(tiny_engine_dir), "p", "--size", "128x128", "--steps", "1",
                 "-o", str(tmp_path / "out.png")]) == 2
    assert _one_line(capsys).endswith(f"No space left on device: {tmp_path / 'out.png'}")


# ------------------------------------------------------------------- 6. small inputs, large memory


def test_image_size_is_checked_from_the_header_before_decoding(runtime, tmp_path, monkeypatch):
    from PIL import ImageFile

    big = _png_header_only(tmp_path / "big.png", 12000, 12000)
    assert big.stat().st_size < 1000

    def no_decoding(self):
        raise AssertionError("the pixels were decoded before the size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ValueError, match="init image is 12000x12000 but the requested size is 128x128"):
        runtime.generate("p", image=big, height=128, width=128, steps=2, seed=0)


@pytest.mark.parametrize("options, match", [
    ({"num_train_timesteps": 10**8}, r"num_train_timesteps'\] must be 1\.\.10000"),
    ({"num_train_timesteps": 1.5}, r"num_train_timesteps'\] must be a whole number"),
    ({"num_train_timesteps": 3}, "steps=4 is more than num_train_timesteps=3"),
    ({"beta_end": math.inf}, r"beta_end'\] must be a finite number"),
    ([("beta_end", 0.01)], "scheduler_options must be a dict"),
])
def test_scheduler_options_are_bounded_before_anything_is_allocated(runtime, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        runtime.generate("p", height=128, width=128, steps=4, seed=0, scheduler_options=options)


# ------------------------------------------------------------------- 7. bad values accepted silently
# 10. cryptic messages: each names the argument


@pytest.mark.parametrize("kwargs, error, match", [
    ({"guidance_scale": math.nan}, ValueError, "guidance_scale must be a finite number"),
    ({"guidance_scale": math.inf}, ValueError, "guidance_scale must be a finite number"),
    ({"guidance_scale": "7"}, TypeError, "guidance_scale must be a number, got str"),
    ({"seed": 1.9}, TypeError, "seed must be a whole number"),
    ({"seed": "1"}, TypeError, "seed must be a whole number"),
    ({"seed": -1}, ValueError, "seed must be 0..18446744073709551615, got -1"),
    ({"seed": 2**64}, ValueError, "seed must be 0.."),
    ({"num_images": True}, TypeError, "num_images must be a whole number"),
    ({"height": "128"}, TypeError, "height must be a whole number .int., got str"),
    ({"width": 128.0}, TypeError, "width must be a whole number"),
    ({"steps": 0}, ValueError, "steps must be 1..1000, got 0"),
    ({"strength": 0.5}, ValueError, "strength only applies to img2img"),
    ({"prompt": None}, TypeError, "prompt must be a string or a non-empty list of strings, got NoneType"),
    ({"prompt": ["a", 3]}, TypeError, r"prompt\[1\] must be a string, got int"),
    ({"negative_prompt": 5}, TypeError, "negative_prompt must be a string"),
    ({"scheduler": None}, TypeError, "scheduler must be a scheduler name"),
])
def test_bad_values_are_refused_naming_the_argument(runtime, kwargs, error, match):
    request = {"prompt": "a lighthouse", "height": 128, "width": 128, "steps": 2, "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        runtime.generate(request.pop("prompt"), **request)


def test_integer_like_values_are_still_accepted(runtime):
    import numpy as np

    result = runtime.generate("a lighthouse", height=np.int64(128), width=128, steps=np.int32(1), seed=np.uint32(7),
                              guidance_scale=np.float32(3.0), num_images=1)
    assert result.seed == 7 and isinstance(result.seed, int)
    assert result.parameters["guidance_scale"] == 3.0


def test_single_prompt_that_is_not_unicode_is_named_prompt_not_prompts_1(runtime):
    with pytest.raises(ValueError, match=r"^prompt is not valid Unicode text") as info:
        runtime.generate("a \udcff lighthouse", height=128, width=128, steps=1, seed=0)
    assert "prompts[" not in str(info.value)


def test_prompt_past_75_tokens_runs_in_chunks_without_a_warning(runtime, recwarn):
    """Issue 16 asked for a warning while prompts were cut at 75 tokens; long prompts now run in 77-token chunks
    (issue 12), so nothing is cut and nothing warns."""
    runtime.generate(" ".join(["lighthouse"] * 90), height=128, width=128, steps=1, seed=0)
    runtime.generate(["a"], [" ".join(["fog"] * 80)], height=128, width=128, steps=1, seed=0)
    assert not [w for w in recwarn if "tokens" in str(w.message)]


def test_cli_warns_in_one_line(tiny_engine_dir, tmp_path, capsys, monkeypatch):
    """A warning raised during a command prints as one line naming the command, never a multi-line warning."""
    import warnings

    from rtsd.runtime import Runtime

    generate = Runtime.generate

    def warning_generate(self, *args, **kwargs):
        warnings.warn("something to note", UserWarning)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Runtime, "generate", warning_generate)
    assert main(["generate", str(tiny_engine_dir), "fog", "--size", "128x128", "--steps", "1",
                 "-o", str(tmp_path / "out.png")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("rtsd generate: warning: something to note")


@pytest.mark.parametrize("argv, match", [
    (["--strength", "0.5"], "--strength needs --image"),
    (["-o", "{tmp}/out"], "no image extension"),
    (["-o", "{tmp}/out.xyz"], "unknown image extension '.xyz'"),
    (["-o", "{tmp}"], "is a directory"),
])
def test_cli_generate_refuses_before_loading(tiny_engine_dir, tmp_path, capsys, no_engine_runs, argv, match):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["generate", str(tiny_engine_dir), "a prompt", "--size", "128x128", "--steps", "1", *argv]) == 2
    assert match in _one_line(capsys)


def test_cli_parity_refuses_zero_steps(tiny_engine_dir, tiny_checkpoint, capsys, monkeypatch):
    import rtsd.export.parity

    monkeypatch.setattr(rtsd.export.parity, "check_engine_dir", lambda *a, **k: pytest.fail("parity ran"))
    assert main(["parity", str(tiny_engine_dir), "--checkpoint", str(tiny_checkpoint), "--steps", "0"]) == 2
    assert "--steps must be at least 1" in _one_line(capsys)


# ------------------------------------------------------------------- 8. late failures


def test_export_to_the_current_directory_fails_before_any_work(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import rtsd.models

    monkeypatch.setattr(rtsd.models, "load_checkpoint", lambda *a, **k: pytest.fail("the export started"))
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--output", ".", "--force"]) == 2
    assert "current directory" in _one_line(capsys)
