"""The CFG combine and one scheduler step as ONE elementwise kernel on the device (CuPy), instead of one kernel per
array operation (each a launch, a full read and write of the latents).

The schedulers' step code only uses array operators, ``.clip`` and host scalars (see rtsd/schedulers/base.py), so
the step is traced rather than re-written per algorithm: it runs once on ``Traced`` arrays that record an expression
graph, every host scalar it meets becomes a kernel parameter, and the graph becomes the body of a CuPy
``ElementwiseKernel``. The body depends only on the graph's structure (values are parameters), so one kernel is
compiled per (algorithm, branch) and reused for every step and every generation. The same step code is the NumPy
step, so the fused kernel computes what the NumPy loop computes, operation for operation, in float32; it is compiled
with ``--fmad=false`` so the GPU does not contract a*b+c into one rounding where NumPy rounds twice.

Multistep state (history of model outputs, Heun's pending half step, PNDM's first sample) is ordinary scheduler
state: the trace runs on a shallow copy of the scheduler, and every array the step leaves in that copy's state
becomes one more output of the kernel. A step the tracer cannot express (an operation outside the set above) runs
the plain step instead, the same arithmetic on the array module, one kernel per operation.
"""

from __future__ import annotations

import copy
import hashlib
from collections import deque
from typing import Any, Callable

import numpy as np

KERNEL_OPTIONS = ("--fmad=false",)  # NumPy rounds a*b and +c separately; nvcc/NVRTC would fuse them by default


class Untraceable(TypeError):
    """The step used something the fused kernel cannot express; the plain step runs instead."""


class _Node:
    """One value of the step's expression graph: an input array, a scalar parameter, or an operation."""

    __slots__ = ("op", "args")

    def __init__(self, op: str, args: tuple):
        self.op, self.args = op, args


_BINARY = {"add": "+", "sub": "-", "mul": "*", "truediv": "/"}


class Traced:
    """A float32 array stand-in that records operations instead of computing them (shape and dtype are real)."""

    __array_ufunc__ = None  # a NumPy function applied to it fails: only what CuPy arrays share with NumPy is traced

    def __init__(self, node: _Node, tracer: "_Tracer", shape: tuple[int, ...]):
        self.node, self._tracer, self.shape = node, tracer, shape

    dtype = np.dtype(np.float32)

    def __array__(self, *args, **kwargs):
        raise Untraceable("the step converted a device array to a host array")

    def _operand(self, value) -> _Node:
        if isinstance(value, Traced):
            if value.shape != self.shape:
                raise Untraceable(f"operands of shapes {value.shape} and {self.shape} (the kernel is elementwise)")
            return value.node
        return self._tracer.scalar(value)

    def _op(self, op: str, *args) -> "Traced":
        return Traced(_Node(op, args), self._tracer, self.shape)

    def __neg__(self):
        return self._op("neg", self.node)

    def __pos__(self):
        return self

    def clip(self, lo, hi):
        return self._op("clip", self.node, self._operand(lo), self._operand(hi))

    def astype(self, dtype, copy: bool = True):
        if np.dtype(dtype) != np.float32:
            raise Untraceable(f"astype({np.dtype(dtype)}) in a float32 step")
        return self

    def __pow__(self, other):
        return self._op("pow", self.node, self._operand(other))

    def __rpow__(self, other):
        return self._op("pow", self._operand(other), self.node)


def _binary(name: str, reflected: bool) -> Callable:
    def op(self: Traced, other):
        a, b = self.node, self._operand(other)
        return self._op(name, *((b, a) if reflected else (a, b)))

    return op


for _name in _BINARY:
    setattr(Traced, f"__{_name}__", _binary(_name, reflected=False))
    setattr(Traced, f"__r{_name}__", _binary(_name, reflected=True))


class _Tracer:
    """Leaves (device arrays, by identity) and scalar parameters of one traced step."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.arrays: list[Any] = []
        self.array_nodes: dict[int, Traced] = {}
        self.params: list[float] = []

    def leaf(self, array) -> Traced:
        key = id(array)
        if key not in self.array_nodes:
            if tuple(array.shape) != self.shape or np.dtype(array.dtype) != np.float32:
                raise Untraceable(f"input of shape {tuple(array.shape)} / {array.dtype}; the step kernel is float32")
            self.array_nodes[key] = Traced(_Node("in", (len(self.arrays),)), self, self.shape)
            self.arrays.append(array)
        return self.array_nodes[key]

    def scalar(self, value) -> _Node:
        # NumPy (NEP 50) treats Python int/float as weak scalars: float32 arithmetic. A float64 NumPy scalar would
        # promote the step to float64, which a float32 kernel would not reproduce.
        weak = isinstance(value, (int, float)) and not isinstance(value, (bool, np.generic))  # np.float64 is a float
        if not (weak or isinstance(value, np.float32)):
            raise Untraceable(f"operand of type {type(value).__name__}")
        self.params.append(float(value))
        return _Node("param", (len(self.params) - 1,))


def _walk(value, visit: Callable[[Any], Any]):
    """``value`` with ``visit`` applied to every leaf inside lists, tuples and deques (other objects unchanged)."""
    if isinstance(value, list):
        return [_walk(v, visit) for v in value]
    if isinstance(value, tuple):
        return tuple(_walk(v, visit) for v in value)
    if isinstance(value, deque):
        return deque((_walk(v, visit) for v in value), maxlen=value.maxlen)
    return visit(value)


class _Kernels:
    """Compiled kernels by body: one per expression structure, shared by every FusedStep of a process."""

    def __init__(self):
        self._cache: dict[tuple, Any] = {}

    def get(self, xp, n_arrays: int, n_params: int, n_outputs: int, body: str):
        key = (id(xp), n_arrays, n_params, n_outputs, body)
        kernel = self._cache.get(key)
        if kernel is None:
            ins = [f"float32 a{k}" for k in range(n_arrays)] + [f"float32 p{k}" for k in range(n_params)]
            outs = [f"float32 r{k}" for k in range(n_outputs)]
            name = "rtsd_step_" + hashlib.sha1(body.encode()).hexdigest()[:12]
            kernel = xp.ElementwiseKernel(", ".join(ins), ", ".join(outs), body, name, options=KERNEL_OPTIONS)
            self._cache[key] = kernel
        return kernel

    def __len__(self) -> int:
        return len(self._cache)


KERNELS = _Kernels()


def kernel_body(outputs: list[_Node]) -> str:
    """C body of the elementwise kernel computing ``outputs`` (r0, r1, ...) from a0.. (arrays) and p0.. (scalars).

    Each operation node is one float temporary, emitted once (the graph is a DAG: a value used twice is computed
    once). The operations map to the float32 C functions CUDA and C99 share.
    """
    names: dict[int, str] = {}
    lines: list[str] = []

    def name(node: _Node) -> str:
        key = id(node)
        if key in names:
            return names[key]
        if node.op == "in":
            text = f"a{node.args[0]}"
        elif node.op == "param":
            text = f"p{node.args[0]}"
        else:
            args = [name(a) for a in node.args]
            if node.op in _BINARY:
                expr = f"{args[0]} {_BINARY[node.op]} {args[1]}"
            elif node.op == "neg":
                expr = f"-{args[0]}"
            elif node.op == "pow":
                expr = f"powf({args[0]}, {args[1]})"
            elif node.op == "clip":
                expr = f"fminf(fmaxf({args[0]}, {args[1]}), {args[2]})"
            else:  # pragma: no cover - Traced creates no other op
                raise Untraceable(f"operation {node.op}")
            text = f"t{len(lines)}"
            lines.append(f"float {text} = {expr};")
        names[key] = text
        return text

    results = [name(node) for node in outputs]
    lines += [f"r{k} = {value};" for k, value in enumerate(results)]
    return "\n".join(lines)


class FusedStep:
    """``step(uncond, cond, guidance_scale, i, x, noise) -> next x``: CFG combine + scheduler step, one kernel.

    ``cond`` is None without classifier-free guidance (``uncond`` is then the model output). ``kernels`` is where
    compiled kernels live (the module default, or a test's).
    """

    def __init__(self, sampler, xp, kernels: _Kernels = KERNELS):
        self.sampler, self.xp, self.kernels = sampler, xp, kernels
        self.fused_steps = 0  # how many steps ran as one kernel (the rest fell back to the plain step)

    def __call__(self, uncond, cond, guidance_scale: float, i: int, x, noise):
        try:
            return self._fused(uncond, cond, guidance_scale, i, x, noise)
        except TypeError:  # Untraceable, or a NumPy function refusing a Traced operand
            return plain_step(self.sampler, uncond, cond, guidance_scale, i, x, noise)

    def _fused(self, uncond, cond, guidance_scale, i, x, noise):
        sampler = self.sampler
        tracer = _Tracer(tuple(x.shape))
        out = tracer.leaf(uncond)
        model_leaves = {id(uncond)}
        if cond is not None:
            model_leaves.add(id(cond))
            out = out + guidance_scale * (tracer.leaf(cond) - out)
        trial = _state_copy(sampler)
        sample_type, shape = type(x), tuple(x.shape)

        def as_leaf(value):  # the history arrays the step reads are kernel inputs too
            is_sample_like = type(value) is sample_type and tuple(value.shape) == shape
            return tracer.leaf(value) if is_sample_like else value

        vars(trial).update({key: _walk(value, as_leaf) for key, value in vars(trial).items()})
        result = trial.step(out, i, tracer.leaf(x), noise=None if noise is None else tracer.leaf(noise))
        if not isinstance(result, Traced):
            raise Untraceable(f"the step returned {type(result).__name__}")

        # Outputs: the next sample, then every traced value the step keeps in its state. A raw model output kept in
        # the state is copied out too: the engine overwrites its output buffer on the next call.
        outputs: list[_Node] = [result.node]
        slots: dict[int, int] = {id(result.node): 0}

        def claim(value):
            if isinstance(value, Traced) and (value.node.op != "in" or id(tracer.arrays[value.node.args[0]]) in model_leaves):
                if id(value.node) not in slots:
                    slots[id(value.node)] = len(outputs)
                    outputs.append(value.node)
            return value

        state = {key: _walk(value, claim) for key, value in vars(trial).items()}
        kernel = self.kernels.get(self.xp, len(tracer.arrays), len(tracer.params), len(outputs), kernel_body(outputs))
        params = [np.float32(p) for p in tracer.params]
        arrays = kernel(*tracer.arrays, *params)
        arrays = arrays if isinstance(arrays, tuple) else (arrays,)

        def materialise(value):
            if isinstance(value, Traced):
                slot = slots.get(id(value.node))
                return arrays[slot] if slot is not None else tracer.arrays[value.node.args[0]]
            return value

        vars(sampler).update({key: _walk(value, materialise) for key, value in state.items()})
        self.fused_steps += 1
        return arrays[0]


def plain_step(sampler, uncond, cond, guidance_scale: float, i: int, x, noise):
    """The CFG combine and step as array operations (NumPy on the host; one kernel each on CuPy)."""
    out = uncond if cond is None else uncond + guidance_scale * (cond - uncond)
    return sampler.step(out, i, x, noise=noise)


def _state_copy(sampler):
    """A copy of the scheduler whose containers are new (the trial step may reassign or append), arrays shared."""
    trial = copy.copy(sampler)
    for key, value in vars(sampler).items():
        if isinstance(value, (list, deque, dict)):
            setattr(trial, key, copy.copy(value))
    return trial


def device_step(sampler, xp, fused: bool = True) -> Callable:
    """The loop's step function for engines on ``xp``: fused where the array module compiles elementwise kernels
    (CuPy), the plain step otherwise (NumPy, where each operation is already a tight host loop; or ``fused=False``,
    the comparison row of benchmarks/loop_overhead.py)."""
    if not fused or getattr(xp, "ElementwiseKernel", None) is None:
        return lambda uncond, cond, g, i, x, noise: plain_step(sampler, uncond, cond, g, i, x, noise)
    return FusedStep(sampler, xp)


__all__ = ["FusedStep", "KERNELS", "Traced", "Untraceable", "device_step", "kernel_body", "plain_step"]
