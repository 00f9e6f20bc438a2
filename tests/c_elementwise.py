"""CuPy's ``ElementwiseKernel`` on the CPU: the kernel body rtsd generates, compiled by the system C compiler.

The fused device step (rtsd/engine/fused_step.py) writes a CUDA elementwise body that only uses float arithmetic
and the float32 math functions C99 and CUDA share (powf, fminf, fmaxf). This stand-in compiles that exact body
with ``cc`` (no fast-math, no FMA contraction: the kernel is built with --fmad=false) into a loop over the elements,
and runs it on NumPy arrays through ctypes, so the text that reaches NVRTC on a GPU is compiled and checked here.

It is as strict as CuPy's documented signature rules where the fused step relies on them: parameters are
``float32 NAME`` (arrays or scalars), arrays must be float32 and of one shape, and an unknown option is refused.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

_PARAM = re.compile(r"^float32 ([A-Za-z_][A-Za-z0-9_]*)$")
KNOWN_OPTIONS = {"--fmad=false"}
_BUILD_DIR = Path(tempfile.mkdtemp(prefix="rtsd-c-elementwise-"))


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def _names(params: str) -> list[str]:
    names = []
    for part in params.split(","):
        match = _PARAM.match(part.strip())
        if match is None:
            raise ValueError(f"unsupported kernel parameter {part.strip()!r} (the fused step declares float32 only)")
        names.append(match.group(1))
    return names


class ElementwiseKernel:
    compiled = 0  # how many kernels were built (one per distinct body), across instances

    def __init__(self, in_params: str, out_params: str, operation: str, name: str = "kernel", options=()):
        unknown = set(options) - KNOWN_OPTIONS
        if unknown:
            raise ValueError(f"unknown NVRTC options {sorted(unknown)}")
        self.inputs, self.outputs, self.name = _names(in_params), _names(out_params), name
        self._function = self._build(operation)

    def _build(self, operation: str):
        ins, outs = self.inputs, self.outputs
        loads = "".join(f"float {n} = a[{k}][kind[{k}] ? i : 0];\n" for k, n in enumerate(ins))
        stores = "".join(f"r[{k}][i] = {n};\n" for k, n in enumerate(outs))
        source = (
            "#include <math.h>\n"
            f"void run(long n, const float **a, const int *kind, float **r) {{\n"
            f"for (long i = 0; i < n; ++i) {{\n{loads}float {', '.join(outs)};\n{operation}\n{stores}}}\n}}\n"
        )
        digest = hashlib.sha1(source.encode()).hexdigest()[:16]
        c_file, library = _BUILD_DIR / f"{digest}.c", _BUILD_DIR / f"{digest}.so"
        if not library.exists():
            c_file.write_text(source)
            subprocess.run([compiler(), "-std=c99", "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
                            "-o", str(library), str(c_file), "-lm"], check=True, capture_output=True, text=True)
            type(self).compiled += 1
        function = ctypes.CDLL(str(library)).run
        function.argtypes = [ctypes.c_long, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
                             ctypes.POINTER(ctypes.c_void_p)]
        return function

    def __call__(self, *args):
        if len(args) != len(self.inputs):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.inputs)} input parameters")
        shapes = {a.shape for a in args if isinstance(a, np.ndarray)}
        if len(shapes) != 1:
            raise ValueError(f"{self.name}: array arguments of shapes {sorted(shapes)}")
        shape = shapes.pop()
        keep, kinds = [], []
        for name, value in zip(self.inputs, args):
            if isinstance(value, np.ndarray):
                if value.dtype != np.float32:
                    raise TypeError(f"{self.name}: {name} is {value.dtype}, declared float32")
                keep.append(np.ascontiguousarray(value, dtype=np.float32))
                kinds.append(1)
            elif isinstance(value, np.float32):
                keep.append(np.array([value], np.float32))
                kinds.append(0)
            else:
                raise TypeError(f"{self.name}: scalar {name} must be numpy.float32, got {type(value).__name__}")
        outputs = [np.empty(shape, np.float32) for _ in self.outputs]
        pointers = (ctypes.c_void_p * len(keep))(*[a.ctypes.data for a in keep])
        kind_array = (ctypes.c_int * len(kinds))(*kinds)
        out_pointers = (ctypes.c_void_p * len(outputs))(*[o.ctypes.data for o in outputs])
        self._function(int(np.prod(shape)), pointers, kind_array, out_pointers)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class CompiledCPU:
    """An array module with ``ElementwiseKernel`` (what the fused step needs of CuPy), over NumPy memory."""

    ElementwiseKernel = ElementwiseKernel
