"""Boundary helpers of the ``rtsd`` command: output paths checked before the work starts, errors and warnings as
one line each. Kept out of cli.py so the command table stays readable."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path


def error_line(exc: BaseException) -> str:
    """One line for a user error: OSErrors as 'what: path' (not '[Errno 17] ...'), others as their message."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def one_line_warnings(prefix: str):
    """Show warnings as 'rtsd CMD: warning: message' instead of Python's two-line file:line format."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def check_image_outputs(paths: list[Path]) -> None:
    """Each path must be writable as an image Pillow can save, judged by its extension; checked before generating."""
    from PIL import Image

    saveable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    for path in paths:
        if path.is_dir():
            raise ValueError(f"-o {path} is a directory; give a file name inside it, e.g. {path / 'image.png'}")
        if path.suffix.lower() not in saveable:
            raise ValueError(f"-o {path}: {'no' if not path.suffix else 'unknown'} image extension "
                             f"{path.suffix!r}; use e.g. {path.with_suffix('.png').name} (.png keeps the parameters)")
        check_file_output(path, "-o")


def check_file_output(path: Path, option: str) -> None:
    """A file can be created at ``path``: it is not a directory, and no file sits where a parent folder must be."""
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file name inside it")
    from rtsd.export.output_dir import blocking_parent

    blocking = blocking_parent(path)
    if blocking is not None:
        raise ValueError(f"{option} {path}: {blocking} is a file, not a directory; choose another path")
