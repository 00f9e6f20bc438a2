"""Where an export writes: the output directory checks, the hidden work directory beside it, and its clean-up.

- rtsd only ever replaces a directory that is empty or carries an rtsd manifest; anything else is the user's and is
  refused even with ``--force``. ``.``, ``..``, the current directory or one above it are refused as outputs.
- The work directory is ``.NAME.partial-PID-XXXX`` beside the output. A killed export (``kill -9``, power loss) leaves
  it behind; the next export into the same place removes those whose process is gone.
- SIGTERM during an export is turned into KeyboardInterrupt, so it cleans up like Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from rtsd.errors import RtsdError

MANIFEST_NAME = "manifest.json"
STALE_UNTAGGED_AGE_S = 24 * 3600  # partial dirs of rtsd versions that did not put the PID in the name


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that cannot or must not be replaced by an engine directory."""
    resolved = output.resolve()
    cwd = Path.cwd().resolve()
    if output.name in ("", ".", "..") or resolved == cwd or resolved in cwd.parents or resolved.parent == resolved:
        raise RtsdError(f"output {output} is the current directory, one above it, or the root; choose a new "
                        f"directory name, e.g. --output engines")
    if output.exists() and not output.is_dir():
        raise RtsdError(f"output {output} exists and is not a directory; choose another --output")
    blocking = blocking_parent(output)
    if blocking is not None:
        raise RtsdError(f"output {output}: {blocking} is a file, not a directory; choose another --output")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not is_engine_dir(output):
        raise RtsdError(f"output directory {output} is not empty and is not an rtsd engine directory (no rtsd "
                        f"manifest.json); rtsd replaces only its own engine directories: choose another --output")
    if not overwrite:
        raise RtsdError(f"output directory {output} is not empty; pass --force to replace it")


def is_engine_dir(path: Path) -> bool:
    """True when ``path`` holds a manifest.json written by rtsd (any format version)."""
    manifest = path / MANIFEST_NAME
    try:
        if not manifest.is_file() or manifest.stat().st_size > 64 * 1024 * 1024:
            return False
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and isinstance(data.get("components"), dict)


def make_work_dir(output: Path) -> Path:
    """A fresh hidden directory beside ``output`` named after this process, readable by other users when done."""
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the engine dir is read by serving processes of other users
    return work


def remove_stale_work_dirs(output: Path) -> list[Path]:
    """Remove ``.NAME.partial-*`` beside ``output`` left by exports whose process no longer runs; returns them."""
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.partial-(?:(\d+)-)?")
    removed = []
    if not output.parent.is_dir():
        return removed
    for candidate in output.parent.iterdir():
        match = pattern.match(candidate.name)
        if not match or not candidate.is_dir() or candidate.is_symlink():
            continue
        pid = int(match.group(1)) if match.group(1) else None
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        try:
            if pid is None and time.time() - candidate.stat().st_mtime < STALE_UNTAGGED_AGE_S:
                continue  # an older rtsd's export may still be writing it
        except OSError:
            continue  # removed meanwhile by another export
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs in the main thread, SIGTERM raises KeyboardInterrupt (so ``finally`` clean-ups run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def blocking_parent(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (so nothing can be created below it), else None."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None
