"""ControlNet engines: export beside a model (``rtsd export --controlnet NAME=PATH``), add to an existing engine
directory without touching its other engines (``rtsd export --add-controlnet DIR NAME=PATH``), and parity.

A ControlNet is the manifest component ``controlnet.NAME`` (file ``controlnet.NAME.onnx``), whose record also holds
``controlnet: {name, source: {file, sha256, format}, family, hint_channels}``. Its I/O is ``specs.controlnet_spec``:
it returns the residuals the UNet of a format-4 directory takes as inputs, so any number of ControlNets drive the same
UNet engine (the runtime sums their residuals).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Sequence

from rtsd.errors import EngineDirError, RtsdError

COMPONENT_PREFIX = "controlnet."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
Progress = Callable[[str], None]


def component_name(name: str) -> str:
    return COMPONENT_PREFIX + name


def controlnet_components(manifest) -> list[str]:
    """The manifest's ControlNet components, in manifest order."""
    return [c for c, record in manifest.components.items() if "controlnet" in record]


def parse_pair(text: str, flag: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path); ValueError naming the flag and the expected form."""
    name, sep, path = text.partition("=")
    if not sep or not path or not _NAME.match(name):
        raise ValueError(f"{flag} takes NAME=PATH with NAME of letters, digits, '_' or '-' (e.g. canny=control.pth), "
                         f"got {text!r}")
    return name, path


def check_names(pairs: Sequence[tuple[str, str | Path]]) -> None:
    names = [name for name, _ in pairs]
    for name in names:
        if not _NAME.match(name):
            raise ValueError(f"ControlNet name {name!r} must be letters, digits, '_' or '-' (e.g. canny)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"ControlNet name(s) {', '.join(duplicates)} given twice; give each ControlNet its own name")


def load_for(config, pairs: Sequence[tuple[str, str | Path]]) -> dict[str, tuple]:
    """{name: (reference ControlNet, ControlNetInfo)} for ``config``'s UNet; one-line errors for files of another
    family, before anything is exported."""
    import torch

    from rtsd.controlnet_checkpoint import check_matches, load_controlnet, open_controlnet

    check_names(pairs)
    for name, path in pairs:  # headers only: refuse a mismatch before loading any weights
        check_matches(open_controlnet(path), config, name)
    return {name: load_controlnet(path, dtype=torch.float32) for name, path in pairs}


def export_controlnet(name: str, model, info, config, work: Path, shape_range, precision: str = "fp32") -> dict:
    """Write ``controlnet.NAME.onnx`` into ``work``; return its manifest record."""
    from rtsd.export.onnx import export_module
    from rtsd.export.pipeline import _profile_json, _sha256_remembered
    from rtsd.export.specs import controlnet_spec

    component = component_name(name)
    spec = controlnet_spec(config, component)
    files = export_module(_Wrapper(model).eval(), spec, work / f"{component}.onnx", shape_range, precision=precision)
    return {"onnx": {"file": files[0].name, "data_files": [f.name for f in files[1:]],
                     "sha256": _sha256_remembered(files[0]), "precision": precision,
                     "data_sha256": {f.name: _sha256_remembered(f) for f in files[1:]}},
            "io": spec.to_dict(), "profile": _profile_json(spec.profile(shape_range)), "engines": {},
            "controlnet": {"name": name, "family": info.family, "hint_channels": info.hint_channels,
                           "source": {"file": info.path.name, "path": str(info.path.resolve()),
                                      "sha256": info.sha256(), "format": info.format}}}


def _wrapper_class():
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, controlnet):
            super().__init__()
            self.controlnet = controlnet

        def forward(self, sample, timestep, encoder_hidden_states, control_image, conditioning_scale):
            return self.controlnet(sample, timestep, encoder_hidden_states, control_image, conditioning_scale)

    return Wrapper


def _Wrapper(model):
    return _wrapper_class()(model)


def add_controlnets(engine_dir: str | Path, pairs: Sequence[tuple[str, str | Path]], *, overwrite: bool = False,
                    check: bool = True, backend: str | None = None, progress: Progress | None = print) -> Path:
    """Add ControlNet engines to an existing engine directory: new files + an updated manifest; every other engine
    file stays as it is (the UNet of a format-4 directory already takes the residuals). The new files are written
    under temporary names and renamed only when complete and checked."""
    from rtsd.export.manifest import CONTROLNET_FORMAT, Manifest
    from rtsd.export.output_dir import sigterm_as_interrupt

    engine_dir = Path(engine_dir)
    say = progress or (lambda message: None)
    manifest = Manifest.read(engine_dir)
    if manifest.format_version < CONTROLNET_FORMAT:
        raise EngineDirError(f"{engine_dir} was exported before ControlNet support (format {manifest.format_version}): "
                             f"its UNet takes no ControlNet residuals; re-export it with this rtsd (`rtsd export "
                             f"--checkpoint CKPT --output {engine_dir} --controlnet NAME=PATH`)")
    taken = [n for n, _ in pairs if component_name(n) in manifest.components]
    if taken and not overwrite:
        raise ValueError(f"{engine_dir} already has ControlNet(s) {', '.join(taken)}; choose another name or pass "
                         "--overwrite to replace")
    with sigterm_as_interrupt():
        loaded = load_for(manifest.model, pairs)
        staging = engine_dir / f".controlnet-add-{'-'.join(n for n, _ in pairs)}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            records = {}
            for name, (model, info) in loaded.items():
                say(f"exporting ControlNet {name} ({info.path.name}, {info.family}) to ONNX")
                records[component_name(name)] = export_controlnet(name, model, info, manifest.model, staging,
                                                                  manifest.shape_range)
            if check:
                _check_staged(staging, manifest, records, loaded, say)
            for component, record in records.items():
                for file in [record["onnx"]["file"], *record["onnx"]["data_files"]]:
                    (staging / file).replace(engine_dir / file)
                manifest.components[component] = record
            manifest.write(engine_dir)  # atomic; the new files are complete before the manifest names them
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if backend == "tensorrt":
        from rtsd.export.tensorrt import build_engines

        build_engines(engine_dir, manifest, components=list(records), progress=say)
    say(f"added ControlNet(s) {', '.join(n for n, _ in pairs)} to {engine_dir}")
    return engine_dir


def _check_staged(staging: Path, manifest, records: dict, loaded: dict, say: Progress) -> None:
    """fp32 ONNX Runtime vs the reference ControlNet for each staged file, before it joins the directory."""
    from rtsd.engine.onnxruntime import OnnxRuntimeEngine
    from rtsd.export.manifest import Manifest

    staged = Manifest(model=manifest.model, shape_range=manifest.shape_range, source={}, tokenizer={},
                      components=records)
    failed = []
    for component, record in records.items():
        engine = OnnxRuntimeEngine(component, staging / record["onnx"]["file"], staged.spec(component),
                                   ["CPUExecutionProvider"])
        check = controlnet_parity(engine, loaded[component[len(COMPONENT_PREFIX):]][0], manifest.shape_range,
                                  record["onnx"]["precision"])
        record["parity"] = {"backend": "onnxruntime", "inputs": check.name.split()[1], "criterion": check.criterion,
                            "passed": check.passed, **check.metrics.to_dict()}
        say(f"      {check.name}: rel_l2 {check.metrics.rel_l2:.2e} cosine {check.metrics.cosine:.6f}")
        if not check.passed:
            failed.append(check.name)
    if failed:
        raise RtsdError(f"ControlNet engines do not match the reference ({', '.join(failed)}); nothing was added")


def controlnet_parity(engine, model, shape_range, precision: str, images: int = 1, height: int | None = None,
                      width: int | None = None):
    """One parity Check of a ControlNet engine against its reference: all residuals, concatenated."""
    import numpy as np
    import torch

    from rtsd.export.parity import compare, judge

    spec = engine.spec
    height = height or shape_range.min_size
    width = width or shape_range.min_size
    rows = images * spec.batch_factor
    feeds = spec.sample_inputs(rows, height, width, seed=rows + height + width)
    out = engine.infer({k: engine.xp.asarray(v) for k, v in feeds.items()})
    actual = np.concatenate([np.asarray(engine.to_host(out[t.name])).ravel() for t in spec.outputs])
    with torch.inference_mode():
        expected = model(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    expected = np.concatenate([e.numpy().ravel() for e in expected])
    shape = "x".join(map(str, feeds["sample"].shape))
    return judge(f"{spec.name} {shape}", compare(actual, expected), precision)


def reference_controlnets(engine_dir: str | Path, given: dict[str, str | Path],
                          progress: Progress | None = None) -> dict:
    """{name: reference ControlNet} for ``rtsd parity``: the files given, else those recorded at export when they
    are unchanged (sha256); ControlNets without a file are reported and left out."""
    import torch

    from rtsd.controlnet_checkpoint import load_controlnet, open_controlnet
    from rtsd.export.manifest import Manifest

    say = progress or (lambda message: None)
    manifest = Manifest.read(engine_dir)
    known = {manifest.components[c]["controlnet"]["name"]: manifest.components[c]["controlnet"]
             for c in controlnet_components(manifest)}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{engine_dir} has no ControlNet named {', '.join(unknown)}; it has "
                         f"{', '.join(sorted(known)) or 'none'}")
    models = {}
    for name, record in known.items():
        path = given.get(name)
        if path is None:
            recorded = Path(record["source"].get("path", ""))
            if recorded.is_file() and open_controlnet(recorded).sha256() == record["source"]["sha256"]:
                path = recorded
            else:
                say(f"      controlnet.{name}: not checked ({record['source']['file']} is not at {recorded}; pass "
                    f"--controlnet {name}=PATH)")
                continue
        models[name] = load_controlnet(path, dtype=torch.float32)[0]
    return models
