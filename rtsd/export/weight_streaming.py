"""Weights of a freshly traced graph, one tensor at a time, straight into the component's external data file.

onnx-graphsurgeon's ``fold_constants`` evaluates every constant subgraph at once with ONNX Runtime, so the weights
torch's exporter puts behind a Transpose (every Linear on a 3-D input: ``MatMul(x, Transpose(W))``) are held by the
graph, by the folding model and by ONNX Runtime together: over 21 GiB for the full-size SDXL UNet. Here each
weight's layout chain (Transpose, Cast, Identity) is applied in NumPy as the weight is read and appended to the data
file; the graph keeps only a reference (offset, length) to it. graphsurgeon then folds what is left, which is
small: shape arithmetic and the few constants a constant subgraph reads (those are kept in memory for it).

The peak is one weight (plus its transposed copy), whatever the model's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_FOLDABLE_CHAIN = {"Transpose", "Cast", "Identity"}
_ALIGNMENT = 4096  # page-aligned offsets: ONNX Runtime can memory-map the weights
# Smaller tensors (norm scales, biases, small constants) stay in memory, where graphsurgeon folds what reads them
# (a GroupNorm scale's Unsqueeze); onnx.save_model appends them to the same data file afterwards.
STREAM_FROM = 64 * 1024  # bytes


class DataFile:
    """Append-only external data file; ``append`` returns the TensorProto that refers to what it wrote."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")

    def append(self, name: str, array: np.ndarray):
        from onnx import TensorProto, helper

        offset = -self._file.tell() % _ALIGNMENT + self._file.tell()
        self._file.seek(offset)
        array = np.ascontiguousarray(array)
        array.tofile(self._file)
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                            data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read(constant, base_dir: Path) -> np.ndarray:
    """The values of a graphsurgeon Constant whose proto may point at the tracer's external files, without keeping
    them in that proto (``onnx.numpy_helper.to_array`` loads external bytes into the proto it is given)."""
    from onnx import TensorProto, numpy_helper
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if not isinstance(constant._values, LazyValues):
        return constant.values
    scratch = TensorProto()
    scratch.CopyFrom(constant._values.tensor)
    return numpy_helper.to_array(scratch, base_dir=str(base_dir))


def stream(graph, traced: dict, base_dir: Path, out: DataFile) -> tuple[set[str], set[str]]:
    """Fold the layout chain of every traced weight (weights_map.trace) into its values and stream every weight the
    graph keeps to ``out``. base_dir: where the traced model's external data lies.

    Returns (traced parameters folded here, every tensor streamed). A traced weight whose chain holds other layout
    ops (a Reshape) is loaded into memory instead, for graphsurgeon to fold (weights_map.name_folded names it); the
    caller keeps graphsurgeon from folding nodes that read a streamed tensor (``reads_streamed``).
    """
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from rtsd.export.weights_map import layout_chain

    tensors = graph.tensors()
    folded, in_memory = set(), set()
    for name in traced:
        weight = tensors[name]
        chain = layout_chain(weight)
        if not all(node.op in _FOLDABLE_CHAIN for node in chain):
            in_memory.add(name)
            continue
        values = _apply(chain, read(weight, base_dir))
        if chain:
            leaf = chain[-1].outputs[0]
            for consumer in list(leaf.outputs):
                consumer.inputs[consumer.inputs.index(leaf)] = weight
            chain[0].inputs.clear()  # the chain is now dead; cleanup removes it
        weight.values = LazyValues(out.append(name, values))
        folded.add(name)
    graph.cleanup()
    streamed = set(folded)
    for tensor in graph.tensors().values():
        if tensor.name in folded or not _is_lazy(tensor):
            continue
        values = read(tensor, base_dir)
        if tensor.name in in_memory or values.nbytes < STREAM_FROM:
            tensor.values = values
        else:
            tensor.values = LazyValues(out.append(tensor.name, values))
            streamed.add(tensor.name)
    return folded, streamed


def reads_streamed(streamed: set[str]):
    """graphsurgeon ``should_exclude_node``: a node reading a streamed weight stays in the graph (its values are on
    disk; ONNX Runtime computes it at run time, e.g. the text encoder's position-embedding Gather)."""
    return lambda node: any(tensor.name in streamed for tensor in node.inputs)


def _apply(chain, values: np.ndarray) -> np.ndarray:
    from onnx import helper

    for node in chain:
        if node.op == "Transpose":
            values = values.transpose(node.attrs.get("perm", range(values.ndim)[::-1]))
        elif node.op == "Cast":
            values = values.astype(helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    return values


def _is_lazy(tensor) -> bool:
    from onnx_graphsurgeon import Constant
    from onnx_graphsurgeon.ir.tensor import LazyValues

    return isinstance(tensor, Constant) and isinstance(tensor._values, LazyValues)
