"""PyTorch reference -> ONNX, one file per sub-model, then graph clean-up.

We use torch's TorchScript-based exporter (``dynamo=False``): it traces SD's fixed-structure networks reliably with
symbolic batch/height/width (``dynamic_axes``), and its graphs are the ones TensorRT's ONNX parser is proven on. The
dynamo exporter in torch 2.13 still fails on parts of these graphs (GroupNorm/SDPA lowering with dynamic shapes).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

from rtsd.export.specs import IOSpec, ShapeRange, specs_for

OPSET = 17
# Protobuf cannot hold a model over 2 GiB; above this size weights go to one external data file beside the .onnx.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def _wrappers():
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, models):
            super().__init__()
            self.text_encoder = models.text_encoder

        def forward(self, input_ids, *extra_embeddings):  # SDXL: no extra_embeddings; (context, pooled) out
            return self.text_encoder(input_ids, *extra_embeddings)

    class UNet(torch.nn.Module):
        def __init__(self, models):
            super().__init__()
            self.unet = models.unet
            self.added_inputs = 2 if models.config.unet.adm_in_channels else 0  # SDXL: text_embeds, time_ids

        def forward(self, sample, timestep, encoder_hidden_states, *extra):
            # SDXL's added conditions (text_embeds, time_ids) come first, then the ControlNet residuals (format 5 on):
            # the down residuals in input-block order, then the mid residual.
            added, residuals = extra[:self.added_inputs], extra[self.added_inputs:]
            down, mid = (list(residuals[:-1]), residuals[-1]) if residuals else (None, None)
            return self.unet(sample, timestep, encoder_hidden_states, *added, down_residuals=down, mid_residual=mid)

    class VAEDecoder(torch.nn.Module):
        """Latents in UNet space -> images in [0, 1] (the runtime only converts to uint8)."""

        def __init__(self, models):
            super().__init__()
            self.vae = models.vae

        def forward(self, latent):
            return (self.vae.decode(latent) / 2 + 0.5).clamp(0, 1)

    class VAEEncoder(torch.nn.Module):
        """Images in [0, 1] -> posterior mean in UNet space."""

        def __init__(self, models):
            super().__init__()
            self.vae = models.vae

        def forward(self, images):
            return self.vae.encode(images * 2 - 1)

    return {"text_encoder": TextEncoder, "unet": UNet, "vae_decoder": VAEDecoder, "vae_encoder": VAEEncoder}


def component_module(models, component: str):
    """The torch module whose ONNX graph is ``component``: the reference model plus the I/O conventions of the spec.

    Half-precision models are wrapped so the graph keeps the spec's float32 inputs and outputs (casts inside it):
    tracing a full-size SDXL UNet in fp16 needs half the memory of tracing it in fp32 and converting afterwards."""
    import torch

    module = _wrappers()[component](models).eval()
    dtype = next(module.parameters()).dtype
    return module if dtype == torch.float32 else _Float32IO(module, dtype).eval()


def _Float32IO(module, dtype):
    import torch

    class Float32IO(torch.nn.Module):
        parameter_prefix = "inner."  # the traced graph's parameter names start with it

        def __init__(self):
            super().__init__()
            self.inner, self.dtype = module, dtype

        def forward(self, *args):
            out = self.inner(*(a.to(self.dtype) if a.is_floating_point() else a for a in args))
            return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    return Float32IO()


def export_component(models, component: str, path: str | Path, shape_range: ShapeRange = ShapeRange(),
                     opset: int = OPSET, precision: str = "fp32", weights_map: dict | None = None) -> list[Path]:
    """Export one sub-model to ``path``; returns the files written (the .onnx and any external data file).

    weights_map: a dict to fill with the component's weights map (export/weights_map.py); the weights then go to
    an external data file, whose offsets the map records.
    """
    spec: IOSpec = specs_for(models.config, shape_range)[component]
    module = component_module(models, component)
    parameters = None
    if weights_map is not None:
        parameters = _lora_parameters(models, component, getattr(module, "parameter_prefix", ""))
    return export_module(module, spec, path, shape_range, opset, precision, parameters, weights_map)


def export_module(module, spec: IOSpec, path: str | Path, shape_range: ShapeRange = ShapeRange(), opset: int = OPSET,
                  precision: str = "fp32", parameters: dict | None = None,
                  weights_map: dict | None = None) -> list[Path]:
    """Trace ``module`` (inputs and outputs as ``spec`` declares) to ``path`` and clean the graph up."""
    import torch

    path = Path(path)
    component = spec.name
    # Trace at the smallest size with 2 rows and a 2-chunk context: every symbolic axis differs from the fixed ones,
    # so the tracer keeps it.
    feeds = spec.sample_inputs(rows=2, height=shape_range.min_size, width=shape_range.min_size, chunks=2)
    dtype = next(module.parameters()).dtype
    device = next(module.parameters()).device
    if dtype == torch.float16 and precision != "fp16":
        raise ValueError(f"{component}: the reference models are fp16; export them with precision='fp16'")
    args = tuple(torch.from_numpy(feeds[t.name]).to(device=device) for t in spec.inputs)  # the spec's I/O dtypes
    # The tracer writes > 2 GB models as one file per tensor: keep them in a scratch folder removed afterwards.
    scratch = Path(tempfile.mkdtemp(prefix=f".{component}-trace-", dir=path.parent))
    try:
        raw = scratch / "model.onnx"
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(module, args, str(raw), input_names=[t.name for t in spec.inputs],
                              output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                              opset_version=opset, do_constant_folding=weights_map is None, dynamo=False)
        # A model traced in fp16 is fp16 already: no float32 -> float16 conversion (and no second copy for it).
        convert = "fp32" if dtype == torch.float16 else precision
        return clean_up(raw, path, precision=convert, parameters=parameters, weights_map=weights_map)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _lora_parameters(models, component: str, graph_prefix: str = "") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Graph parameter name -> (checkpoint key, shape) for every weight a LoRA can address in ``component``.

    graph_prefix: what a wrapper adds in front of the parameter names (``Float32IO``: "inner.")."""
    from rtsd.adapters.lora_keys import lora_table
    shapes = models.ldm_shapes()
    prefix = models.prefixes.get(component)
    keys = {t.key for t in lora_table(shapes, models.config.unet.num_res_blocks).values()}
    return {f"{graph_prefix}{component}.{key[len(prefix):]}": (key, shapes[key]) for key in sorted(keys)
            if prefix and key.startswith(prefix)}


def clean_up(source: Path, target: Path, precision: str = "fp32", parameters: dict | None = None,
             weights_map: dict | None = None) -> list[Path]:
    """Fold constants, drop dead nodes, infer shapes, optionally cast weights to fp16; write ``target``.

    onnx-graphsurgeon does the folding (it evaluates constant subgraphs with ONNX Runtime) and the clean-up.
    parameters (graph name -> (checkpoint key, shape)): keep these weights' initializers named after them through
    the folding and fill ``weights_map`` (export/weights_map.py). Without an fp16 conversion to come, those
    graphs' weights are streamed to the data file one at a time (export/weight_streaming.py) instead of being
    loaded whole: what keeps the full-size SDXL UNet's export within 24 GB.
    """
    from rtsd.export import weights_map as wmap

    import onnx
    import onnx_graphsurgeon as gs

    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # graphsurgeon folds with ORT; its optimizer notes are not for users
    streamed = bool(parameters) and precision == "fp32"  # no fp16 conversion to come: weights go straight to disk
    model = onnx.load(str(source), load_external_data=not streamed)
    graph = gs.import_onnx(model)
    traced = wmap.trace(graph, parameters) if parameters else {}
    folded: set[str] = set()
    exclude = None
    if streamed:
        from rtsd.export.weight_streaming import DataFile, reads_streamed, stream

        with DataFile(target.with_name(target.name + ".data")) as out:
            folded, on_disk = stream(graph, traced, source.parent, out)
        exclude = reads_streamed(on_disk)
    graph.fold_constants(should_exclude_node=exclude).cleanup().toposort()  # in fp32, before any cast to fp16
    wmap.name_folded(graph, {name: leaf for name, leaf in traced.items() if name not in folded})
    model = gs.export_onnx(graph)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # I/O stays float32 (the spec's contract); the converter keeps its op block list (e.g. Resize) in fp32.
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
        model = gs.export_onnx(gs.import_onnx(model).cleanup().toposort())  # the converter appends its Casts last
    elif precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    files = save(model, target, external=True if parameters else None)
    if parameters:
        import onnx

        saved = onnx.load(str(target), load_external_data=False)
        weights_map.update(wmap.build(saved, traced, {n: k for n, (k, _) in parameters.items()},
                                      {k: s for k, s in parameters.values()}, target.name + ".data"))
    return files


def save(model, target: Path, external: bool | None = None) -> list[Path]:
    """Write ``model``; above 2 GB (or when ``external``) the weights go to ``<name>.onnx.data``. Shape inference
    and the checker run by path (the in-memory variants cannot handle > 2 GB models)."""
    import onnx

    # ModelProto.ByteSize() itself fails past 2 GiB; the weights are what makes a model large.
    if external is None:
        external = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data_name = target.name + ".data"
    if external:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)  # shape constants stay inline (ORT infers from them)
    else:
        onnx.save_model(model, str(target))
    onnx.shape_inference.infer_shapes_path(str(target), str(target))
    onnx.checker.check_model(str(target))
    files = [target, target.with_name(data_name)] if external else [target]
    for path in files:
        path.chmod(0o644)  # onnx writes external data owner-only; serving processes of other users read it
    return files
