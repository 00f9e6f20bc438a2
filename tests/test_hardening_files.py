"""Hostile and broken files at the checkpoint and export boundaries (issue 16, defects 1, 2, 4, 9, 10).

Cases that would hang or exhaust memory on a regressed rtsd run in a subprocess with a timeout and an address-space
limit, so a regression fails the test instead of taking the machine down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from rtsd.cli import main
from rtsd.errors import CheckpointError, RtsdError

MEMORY_LIMIT = 2 * 2**30  # bytes of address space for the subprocess cases


def _run_cli_limited(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`python -m rtsd.cli ARGS` with at most MEMORY_LIMIT of address space and a wall-clock timeout."""
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
        from rtsd.cli import main
        sys.exit(main({args!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------- 1. YAML alias bomb


def _alias_bomb(levels: int = 10) -> str:
    """The 454-byte kind of YAML from the issue: each level repeats the previous one nine times."""
    names = "abcdefghijk"
    lines = [f"{names[0]}: &{names[0]} [" + ", ".join(['"lol"'] * 9) + "]"]
    for i in range(1, levels):
        lines.append(f"{names[i]}: &{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]")
    lines.append(f"model: {{params: {{parameterization: *{names[levels - 1]}}}}}")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_in_bounded_memory(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.symlink_to(tiny_checkpoint)
    bomb = _alias_bomb()
    assert len(bomb) < 1000
    checkpoint.with_suffix(".yaml").write_text(bomb)
    result = _run_cli_limited(["info", str(checkpoint)])
    assert result.returncode == 2, result.stderr[-2000:]
    line = _one_line_error(result.stderr)
    assert "model.yaml" in line and "parameterization" in line


def test_yaml_parameterization_still_read_and_oversized_yaml_refused(tiny_checkpoint, tmp_path):
    from rtsd.checkpoint import read_prediction_type

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.symlink_to(tiny_checkpoint)
    yaml_file = checkpoint.with_suffix(".yaml")
    # An alias to a scalar is fine (and common in hand-written configs).
    yaml_file.write_text("base: &p v\nmodel:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                         "  params:\n    parameterization: *p\n")
    assert read_prediction_type(checkpoint) == "v_prediction"
    yaml_file.write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert read_prediction_type(checkpoint) == "epsilon"
    yaml_file.write_text("model:\n  params:\n    parameterization: eps\n" + "# padding\n" * 40_000)
    with pytest.raises(CheckpointError, match="bytes is far more than an original-config YAML"):
        read_prediction_type(checkpoint)


# --------------------------------------------------------------------------------- 9. FIFO as a checkpoint


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
def test_fifo_checkpoint_is_refused_not_read_forever(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    try:
        result = _run_cli_limited(["info", str(fifo)], timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("rtsd info blocked reading a FIFO")
    assert result.returncode == 2
    assert "not a regular file" in _one_line_error(result.stderr)


def test_fifo_yaml_beside_checkpoint_is_ignored(tiny_checkpoint, tmp_path):
    from rtsd.checkpoint import read_prediction_type

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.symlink_to(tiny_checkpoint)
    os.mkfifo(checkpoint.with_suffix(".yaml"))
    assert read_prediction_type(checkpoint) is None  # not a YAML file we can read: nothing beside says


# --------------------------------------------------------------------- 10. torch's pickle warnings on .ckpt


def test_ckpt_load_prints_no_torch_warnings(tmp_path):
    torch = pytest.importorskip("torch")
    from rtsd.checkpoint import open_checkpoint

    path = tmp_path / "lightning.ckpt"
    state = {"model.diffusion_model.conv_in.weight": torch.zeros(32, 4, 3, 3)}
    torch.save({"state_dict": state, "global_step": 10}, path, pickle_protocol=3)  # protocol 3 (not 2): torch warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = open_checkpoint(path)
    assert checkpoint.shapes == {"model.diffusion_model.conv_in.weight": (32, 4, 3, 3)}
    assert [str(w.message) for w in caught] == []


# -------------------------------------------------------------------- 2. export never deletes user files


def test_export_force_refuses_a_directory_that_is_not_an_engine_dir(tiny_checkpoint, tmp_path):
    from rtsd.export.pipeline import export

    output = tmp_path / "photos"
    output.mkdir()
    (output / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(RtsdError, match="not an rtsd engine directory"):
        export(tiny_checkpoint, output, overwrite=True, progress=None)
    assert (output / "holiday.jpg").read_bytes() == b"precious"
    # The same through the CLI, --force included: one line, exit 2, the file untouched.
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--output", str(output), "--force"]) == 2
    assert (output / "holiday.jpg").read_bytes() == b"precious"


def test_demo_does_not_replace_a_user_engines_folder(tmp_path, capsys):
    engines = tmp_path / "work" / "engines"
    engines.mkdir(parents=True)
    (engines / "notes.txt").write_text("mine")
    assert main(["demo", "--workdir", str(tmp_path / "work"), "--steps", "1"]) == 2
    assert "not an rtsd engine directory" in capsys.readouterr().err
    assert (engines / "notes.txt").read_text() == "mine"


def test_output_checks_accept_engine_dirs_and_refuse_the_working_directory(tmp_path, monkeypatch):
    from rtsd.export.output_dir import check_output

    engine_dir = tmp_path / "old-engines"
    engine_dir.mkdir()
    (engine_dir / "manifest.json").write_text('{"format_version": 1, "components": {}}')
    check_output(engine_dir, overwrite=True)  # an rtsd engine directory may be replaced with --force
    with pytest.raises(RtsdError, match="pass --force"):
        check_output(engine_dir, overwrite=False)
    (engine_dir / "manifest.json").write_text('{"name": "my-web-app"}')  # someone else's manifest.json
    with pytest.raises(RtsdError, match="not an rtsd engine directory"):
        check_output(engine_dir, overwrite=True)
    monkeypatch.chdir(engine_dir)
    for output in (Path("."), Path(".."), engine_dir):
        with pytest.raises(RtsdError, match="current directory"):
            check_output(output, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RtsdError, match="is a file, not a directory"):
        check_output(tmp_path / "file" / "engines", overwrite=False)


# --------------------------------------------------------------------------- 4. killed exports clean up


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_export_removes_partial_dirs_of_dead_exports_only(tiny_checkpoint, tmp_path):
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange

    output = tmp_path / "engines"
    stale = tmp_path / f".engines.partial-{_dead_pid()}-abc123"
    (stale / "unet.onnx").parent.mkdir()
    (stale / "unet.onnx").write_bytes(b"\0" * 1024)
    live = tmp_path / f".engines.partial-{os.getppid()}-def456"  # a running process (pytest's parent)
    live.mkdir()
    other = tmp_path / f".other.partial-{_dead_pid()}-ghi789"  # another output's: not ours to judge
    other.mkdir()
    export(tiny_checkpoint, output, shape_range=ShapeRange(min_size=128, max_size=128, opt_size=128, max_batch=1),
           components=("vae_decoder",), check=False, progress=None)
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert (output / "manifest.json").is_file()


def test_sigterm_during_export_leaves_nothing_behind(tiny_checkpoint, tmp_path):
    output = tmp_path / "engines"
    script = (f"import sys; from rtsd.cli import main; "
              f"sys.exit(main(['export', '--checkpoint', {str(tiny_checkpoint)!r}, '--output', {str(output)!r}]))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".engines.partial-*")):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the export never started writing: {process.communicate()}")
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "Traceback" not in stderr, stderr[-2000:]
    assert list(tmp_path.glob(".engines.*")) == [] and not output.exists()
