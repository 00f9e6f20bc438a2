"""FLOPs of one call of each exported sub-model, counted from its ONNX graph at concrete shapes.

    python benchmarks/flops.py ENGINE_DIR [--size 512] [--images 1]
    python benchmarks/flops.py --checkpoint sd.safetensors [--size 512]   no export needed (torch's counter)

The graph is read without its weights; the symbolic input axes are fixed to the benchmark's shapes and ONNX
Runtime's symbolic shape inference (which, unlike onnx's own, follows the Shape/Slice arithmetic of the traced
graph) gives every tensor's shape. Counted, as 2 FLOPs per multiply-add:

    conv        Conv: 2 * output elements * (input channels / groups) * kernel area
    matmul      MatMul / Gemm with a weight operand: linear layers, 1x1 projections, the time embedding MLP
    attention   MatMul of two activations: Q @ K^T and softmax @ V (the causal text encoder's full square included)

Everything else (normalisations, activations, softmax, residual adds) is a few FLOPs per element, well under 1% of
these networks, and is left out; the floor is therefore a slight underestimate, which is the safe side for a floor.

Without an export (``--checkpoint``, or a benchmark run of the baselines only) the same three categories are counted
by torch's FlopCounterMode on the PyTorch reference networks built on the meta device (shapes only, no weights
read, seconds even for SD 1.5); tests/test_benchmark_smoke.py checks both counts are equal.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path

CATEGORIES = ("conv", "matmul", "attention")


def graph_flops(onnx_path: str | Path, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """FLOPs per category for one call of the graph at ``input_shapes`` (every graph input must be given)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = _load_structure(Path(onnx_path))
    for graph_input in model.graph.input:
        if graph_input.name not in input_shapes:
            raise ValueError(f"{onnx_path}: no shape given for input {graph_input.name!r}")
        dims = graph_input.type.tensor_type.shape.dim
        shape = input_shapes[graph_input.name]
        if len(dims) != len(shape):
            raise ValueError(f"{onnx_path}: input {graph_input.name!r} has {len(dims)} axes, got shape {shape}")
        for dim, value in zip(dims, shape):
            dim.ClearField("dim_param")
            dim.dim_value = int(value)
    del model.graph.value_info[:]  # the export's symbolic shapes; inferred again at the concrete ones
    inferred = SymbolicShapeInference.infer_shapes(model)
    shapes = _shapes(inferred)
    weights = {init.name for init in inferred.graph.initializer}
    totals = dict.fromkeys(CATEGORIES, 0)
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        out = _known(shapes, node.output[0], node)
        if node.op_type == "Conv":
            kernel = _known(shapes, node.input[1], node)  # (out channels, in channels / groups, kh, kw)
            totals["conv"] += 2 * math.prod(out) * math.prod(kernel[1:])
        else:
            a = _known(shapes, node.input[0], node)
            transposed = node.op_type == "Gemm" and any(att.name == "transA" and att.i for att in node.attribute)
            inner = a[-2] if transposed else a[-1]
            has_weight = node.input[0] in weights or node.input[1] in weights
            totals["matmul" if has_weight else "attention"] += 2 * math.prod(out) * inner
    return totals


def engine_dir_flops(engine_dir: str | Path, images: int, height: int, width: int,
                     guidance: bool = True) -> dict[str, dict[str, int]]:
    """Per component of an engine directory: FLOPs of one call as the runtime makes it (CFG doubles the rows of
    the text encoder and UNet; the VAE decoder sees one row per image)."""
    from rtsd.export.manifest import Manifest

    engine_dir = Path(engine_dir)
    manifest = Manifest.read(engine_dir)
    result = {}
    for name in ("text_encoder", "unet", "vae_decoder"):
        spec = manifest.spec(name)
        rows = images * (spec.batch_factor if guidance else 1)
        shapes = spec.shapes(rows, height, width)
        result[name] = graph_flops(manifest.onnx_path(engine_dir, name), {t.name: shapes[t.name] for t in spec.inputs})
    return result


def reference_flops(checkpoint: str | Path, images: int, height: int, width: int,
                    guidance: bool = True) -> dict[str, dict[str, int]]:
    """Like ``engine_dir_flops`` but counted by torch on the reference networks (built on the meta device from the
    checkpoint's detected architecture): {component: {"torch": flops}}."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from rtsd.checkpoint import detect_config, open_checkpoint
    from rtsd.export.onnx import component_module
    from rtsd.export.specs import specs_for
    from rtsd.models import build_models

    config = detect_config(open_checkpoint(checkpoint).shapes)
    models, specs = build_models(config, device="meta"), specs_for(config)
    result = {}
    for name in ("text_encoder", "unet", "vae_decoder"):
        spec = specs[name]
        shapes = spec.shapes(images * (spec.batch_factor if guidance else 1), height, width)
        args = [torch.zeros(shapes[t.name], dtype=getattr(torch, t.dtype), device="meta") for t in spec.inputs]
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
            component_module(models, name)(*args)
        result[name] = {"torch": counter.get_total_flops()}
    return result


def _load_structure(path: Path):
    """The graph with the values of every initializer except Conv/MatMul/Gemm weights (gigabytes for a full-size
    UNet, and never needed: shape inference only reads the constants feeding shape arithmetic and elementwise ops)."""
    import onnx
    from onnx.external_data_helper import (
        load_external_data_for_tensor,
        uses_external_data,
    )

    model = onnx.load(str(path), load_external_data=False)
    weights = {name for node in model.graph.node if node.op_type in ("Conv", "MatMul", "Gemm")
               for name in node.input[1:]}
    for tensor in model.graph.initializer:
        if uses_external_data(tensor) and tensor.name not in weights:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


def _shapes(model) -> dict[str, tuple]:
    graph = model.graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                                   for d in value.type.tensor_type.shape.dim)
    return shapes


def _known(shapes: dict[str, tuple], name: str, node) -> tuple[int, ...]:
    shape = shapes.get(name)
    if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"shape inference left {name!r} (input of {node.op_type} {node.name!r}) unknown: {shape}; "
                         f"the FLOP count needs every Conv/MatMul shape")
    return shape


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path, nargs="?", help="an exported engine directory (ONNX count)")
    parser.add_argument("--checkpoint", help="count on the reference networks of this checkpoint instead (torch)")
    parser.add_argument("--size", type=int, default=512, help="image height = width in pixels (default 512)")
    parser.add_argument("--images", type=int, default=1, help="images per call (default 1; CFG doubles the rows)")
    args = parser.parse_args()
    if (args.engine_dir is None) == (args.checkpoint is None):
        parser.error("give an ENGINE_DIR or --checkpoint, not both")
    if args.checkpoint:
        counted = reference_flops(args.checkpoint, args.images, args.size, args.size)
    else:
        counted = engine_dir_flops(args.engine_dir, args.images, args.size, args.size)
    for name, counts in counted.items():
        parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in counts.items())
        print(f"{name:<13} {sum(counts.values()) / 1e9:10.2f} GFLOP   ({parts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
