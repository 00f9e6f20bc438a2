"""The weights map: for every LoRA-addressable checkpoint tensor, the ONNX initializer that holds it, exactly.

torch's exporter names initializers after the module parameters (``unet.input_blocks.1.1.proj_in.weight``), but a
Linear on a 3-D input becomes ``MatMul(x, Transpose(W))``, and constant folding turns ``Transpose(W)`` into a new
constant with a generated name (``onnx::MatMul_3602``). So the export runs without torch's folding; before
onnx-graphsurgeon folds, ``trace`` follows each parameter through layout-only nodes (Transpose, Reshape, ...) to the
tensor a compute node reads, and after folding ``name_folded`` gives that folded constant the parameter's name. The
map then records per checkpoint key: the initializer, the transpose applied on the way (if any), the final shape and
dtype, and where its bytes lie in the component's external data file (so a runtime reads the base weights without
the onnx package). No value matching, no hashing: every entry comes from the graph's edges.

Layout (``manifest.components[name]["weights_map"]``, format_version 3):
    {"data_file": "unet.onnx.data",
     "weights": {ldm_key: {"initializer", "transpose": perm | null, "shape", "source_shape", "dtype",
                           "offset", "length"}},
     "unused": {ldm_key: shape} for weights the graph does not read (e.g. SD 2.x's last text layer)}
Applying: ``array.transpose(perm)`` (if set), ``reshape(shape)``, ``astype(dtype)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rtsd.errors import RtsdError

_LAYOUT_OPS = {"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Cast"}


def layout_chain(tensor) -> list:
    """The layout-only nodes (Transpose, Reshape, ...) from a weight to the tensor a compute node reads, in order."""
    chain = []
    while True:
        consumers = list(tensor.outputs)
        layout = [n for n in consumers if n.op in _LAYOUT_OPS]
        if not layout:
            return chain
        if len(consumers) != 1 or len(layout[0].outputs) != 1:
            raise RtsdError(f"weights map: {chain[0].inputs[0].name if chain else tensor.name} feeds "
                            f"{[n.op for n in consumers]}; cannot name it exactly")
        chain.append(layout[0])
        tensor = layout[0].outputs[0]


def trace(graph, parameters: Mapping[str, str]) -> dict[str, tuple[str, list[int] | None]]:
    """Before folding: graph parameter name -> (tensor a compute node reads, composed transpose perm or None).

    ``parameters`` maps graph parameter names to checkpoint keys; parameters the graph does not hold are skipped.
    """
    tensors = graph.tensors()
    found: dict[str, tuple[str, list[int] | None]] = {}
    for name in parameters:
        tensor = tensors.get(name)
        if tensor is None:
            continue
        perm: list[int] | None = None
        reshaped = False
        chain = layout_chain(tensor)
        for node in chain:
            if node.op == "Transpose":
                if reshaped:
                    raise RtsdError(f"weights map: {name} is transposed after a reshape; not supported")
                step = list(node.attrs.get("perm", range(len(node.inputs[0].shape or ()))[::-1]))
                perm = step if perm is None else [perm[i] for i in step]
            elif node.op != "Cast" and node.op != "Identity":
                reshaped = True
        found[name] = (chain[-1].outputs[0].name if chain else name, perm)
    return found


def name_folded(graph, traced: Mapping[str, tuple[str, list[int] | None]]) -> None:
    """After folding and clean-up: rename each folded constant to its parameter's name (now free)."""
    tensors = graph.tensors()
    for parameter, (leaf, _) in traced.items():
        if leaf == parameter:
            continue
        if parameter in tensors:
            raise RtsdError(f"weights map: {parameter} is still in the graph beside its folded copy {leaf}")
        if leaf not in tensors:
            raise RtsdError(f"weights map: {parameter}'s folded tensor {leaf} disappeared while folding")
        tensors[leaf].name = parameter


def build(model, traced: Mapping[str, tuple[str, list[int] | None]], parameters: Mapping[str, str],
          shapes: Mapping[str, tuple[int, ...]], data_file: str) -> dict:
    """The map of one saved component (``model`` loaded without external data: offsets are read, not bytes)."""
    from onnx import TensorProto, helper

    initializers = {t.name: t for t in model.graph.initializer}
    weights, unused = {}, {}
    for name, key in parameters.items():
        if name not in traced:
            unused[key] = list(shapes[key])
            continue
        tensor = initializers.get(name)
        if tensor is None:
            raise RtsdError(f"weights map: initializer {name} for {key} is missing from the saved graph")
        location = {entry.key: entry.value for entry in tensor.external_data}
        if tensor.data_location != TensorProto.EXTERNAL or location.get("location") != data_file:
            raise RtsdError(f"weights map: {name} is not stored in {data_file}")
        weights[key] = {"initializer": name, "transpose": traced[name][1], "shape": list(tensor.dims),
                        "source_shape": list(shapes[key]),
                        "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).name,
                        "offset": int(location.get("offset", 0)), "length": int(location["length"])}
    return {"data_file": data_file, "weights": weights, "unused": dict(sorted(unused.items()))}


def to_initializer(entry: Mapping, array: np.ndarray) -> np.ndarray:
    """A checkpoint-layout array -> the initializer's layout and dtype (C-contiguous, as engines want it)."""
    if entry.get("transpose") is not None:
        array = array.transpose(entry["transpose"])
    return np.ascontiguousarray(array.reshape(entry["shape"]).astype(entry["dtype"]))


def from_initializer(entry: Mapping, array: np.ndarray) -> np.ndarray:
    """The inverse of ``to_initializer`` (float32): the base weight in the checkpoint's layout."""
    array, checkpoint_shape = array.astype(np.float32), entry["source_shape"]
    perm = entry.get("transpose")
    if perm is None:
        return array.reshape(checkpoint_shape)
    inverse = list(np.argsort(perm))
    transposed_shape = [checkpoint_shape[i] for i in perm]
    return np.ascontiguousarray(array.reshape(transposed_shape).transpose(inverse))
