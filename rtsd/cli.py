"""The ``rtsd`` command: export | generate | parity | info | demo | serve | triton-repo.

User errors (bad paths, options, files, requests) print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rtsd.errors import RtsdError

USER_ERRORS = (RtsdError, ValueError, TypeError, OSError)  # OSError: paths (exists, not a directory, no space)


def main(argv: list[str] | None = None) -> int:
    from rtsd.cli_checks import error_line, one_line_warnings

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with one_line_warnings(f"rtsd {args.command}"):
            return args.run(args) or 0
    except BrokenPipeError:  # `rtsd info ... | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except USER_ERRORS as exc:
        print(f"rtsd {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rtsd {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    from rtsd import __version__

    parser = argparse.ArgumentParser(prog="rtsd", description="Stable Diffusion checkpoints -> ONNX / TensorRT "
                                     "engines -> images, with a torch-free runtime.")
    parser.add_argument("--version", action="version", version=f"rtsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="export a checkpoint to an engine directory")
    p.add_argument("--checkpoint", type=Path, help=".safetensors / .ckpt file or diffusers folder")
    p.add_argument("--output", "-o", type=Path, help="engine directory to create")
    p.add_argument("--backend", choices=("onnx", "tensorrt"), default="onnx",
                   help="onnx: ONNX files run by ONNX Runtime; tensorrt: also build fp16 TensorRT engines")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="ONNX weight precision")
    p.add_argument("--min-size", type=int, default=256, help="smallest image side in pixels (multiple of 8; 64s suit TensorRT best)")
    p.add_argument("--max-size", type=int, default=1024, help="largest image side in pixels (multiple of 8; 64s suit TensorRT best)")
    p.add_argument("--opt-size", type=int, default=512, help="image side TensorRT tunes for")
    p.add_argument("--max-batch", type=int, default=4, help="most images per call (CFG doubles the UNet batch)")
    p.add_argument("--max-prompt-tokens", type=int, default=225,
                   help="longest prompt in tokens, a multiple of 75 (prompts are encoded in 75-token chunks)")
    p.add_argument("--static", action="store_true", help="TensorRT: one fixed shape (opt size, max batch)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0..5")
    p.add_argument("--fp32-vae", action="store_true", help="TensorRT: build the VAE in fp32 (no fp16 overflow)")
    p.add_argument("--rebuild", type=Path, metavar="ENGINE_DIR",
                   help="rebuild the stale TensorRT engines of an existing engine directory (with --backend tensorrt)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="override: weights cannot tell; default from the checkpoint's YAML, else epsilon")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="condition on the N-th text-encoder layer from the end (1 = last; 2 = penultimate, SD 2.x's "
                        "default); default: the family's own")
    p.add_argument("--no-check", action="store_true",
                   help="skip the parity check of the written engines against the PyTorch reference")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", type=_lora_arg,
                   help="merge a LoRA into the weights before export (repeatable; scale default 1.0)")
    p.add_argument("--refittable", action="store_true", help="TensorRT: plans whose LoRA-addressable weights can be "
                   "refitted at run time (switch LoRAs without a rebuild); may cost a little speed")
    p.add_argument("--controlnet", action="append", default=[], metavar="NAME=PATH",
                   help="also export this ControlNet as engine NAME (LDM .pth/.safetensors or diffusers folder; "
                        "repeatable)")
    p.add_argument("--add-controlnet", nargs="+", metavar=("ENGINE_DIR", "NAME=PATH"),
                   help="add ControlNet engine(s) to an existing engine directory; its other engines stay untouched")
    p.set_defaults(run=_export)

    p = sub.add_parser("generate", help="generate images from a prompt")
    p.add_argument("engine_dir", type=Path)
    p.add_argument("prompt")
    p.add_argument("-o", "--output", type=Path, default=Path("out.png"))
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=7.5, help="guidance scale; <= 1 disables classifier-free guidance")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--size", default=None, help="WxH, e.g. 512x512 (default: the init image's size, else the model's: 512x512, SDXL 1024x1024)")
    p.add_argument("--scheduler", default="dpmpp_2m")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--image", type=Path, help="init image for img2img, or the image to inpaint (with --mask)")
    p.add_argument("--mask", type=Path, help="inpainting mask, same size as --image: white = repaint, black = keep "
                   "(needs an engine directory exported from an inpainting checkpoint)")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the init image to repaint (default: 0.8 for img2img, 1.0 for inpainting)")
    p.add_argument("--backend", choices=("tensorrt", "onnxruntime"), default=None)
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the engine files' sha256 against the manifest (done once per file otherwise)")
    p.add_argument("--plain-prompt", action="store_true",
                   help="read the prompts as plain text (no A1111 (word:1.2) / [word] / BREAK syntax)")
    p.add_argument("--embedding", type=Path, action="append", default=[], metavar="PATH",
                   help="textual-inversion file (.pt, .safetensors, .bin), called by its file name; repeatable")
    p.add_argument("--embeddings-dir", type=Path, metavar="DIR",
                   help="load every textual-inversion file in DIR (A1111's embeddings folder)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", type=_lora_arg,
                   help="apply a LoRA at run time (repeatable; scale default 1.0)")
    p.add_argument("--control", action="append", default=[], metavar="NAME=IMAGE[:SCALE]",
                   help="steer with the engine directory's ControlNet NAME and this control image (repeatable; "
                        "scale default 1.0)")
    p.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps before ControlNets act")
    p.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps after which they stop")
    p.add_argument("--guess-mode", action="store_true",
                   help="ControlNet guess mode: control on the conditional half only, log-spaced scales")
    p.set_defaults(run=_generate)

    p = sub.add_parser("parity", help="compare an engine directory with the PyTorch reference")
    p.add_argument("engine_dir", type=Path)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--backend", choices=("tensorrt", "onnxruntime"), default=None)
    p.add_argument("--steps", type=int, default=4, help="steps of the end-to-end check")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    p.add_argument("--controlnet", action="append", default=[], metavar="NAME=PATH",
                   help="the file of the directory's ControlNet NAME (default: the file recorded at export)")
    p.set_defaults(run=_parity)

    p = sub.add_parser("info", help="describe a checkpoint or an engine directory")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_info)

    p = sub.add_parser("demo", help="tiny synthetic checkpoint -> export -> image, on the CPU")
    p.add_argument("--workdir", type=Path, default=Path("rtsd-demo"))
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(run=_demo)

    from rtsd.serving.cli import add_commands as add_serving_commands  # serve, triton-repo

    add_serving_commands(sub)
    return parser


def _export(args) -> int:
    from rtsd.export.controlnet import parse_pair

    if args.add_controlnet:
        from rtsd.export.controlnet import add_controlnets

        engine_dir, *pairs = args.add_controlnet
        if not pairs:
            raise ValueError("--add-controlnet needs ENGINE_DIR and at least one NAME=PATH")
        if args.checkpoint or args.output or args.rebuild or args.controlnet:
            raise ValueError("--add-controlnet changes an existing engine directory: drop --checkpoint, --output, "
                             "--rebuild and --controlnet")
        add_controlnets(engine_dir, [parse_pair(p, "--add-controlnet") for p in pairs], overwrite=args.force,
                        check=not args.no_check, backend=args.backend, progress=print)
        return 0
    controlnets = [parse_pair(p, "--controlnet") for p in args.controlnet]
    if args.rebuild:
        if args.backend != "tensorrt":
            raise ValueError("--rebuild rebuilds TensorRT engines: add --backend tensorrt")
        from rtsd.export.manifest import Manifest
        from rtsd.export.tensorrt import build_engines

        manifest = Manifest.read(args.rebuild)
        build_engines(args.rebuild, manifest, rebuild_stale_only=True, components=tuple(manifest.components),
                      optimization_level=args.opt_level, progress=print)  # ControlNet engines too
        return 0
    if not args.checkpoint or not args.output:
        raise ValueError("export needs --checkpoint PATH and --output DIR (or --rebuild ENGINE_DIR)")
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange

    shape_range = ShapeRange(min_size=args.min_size, max_size=args.max_size,
                             opt_size=min(max(args.opt_size, args.min_size), args.max_size),
                             max_batch=args.max_batch, static=args.static, max_prompt_tokens=args.max_prompt_tokens)
    trt = {"optimization_level": args.opt_level,
           "fp32_components": ("vae_decoder", "vae_encoder") if args.fp32_vae else ()}
    export(args.checkpoint, args.output, shape_range=shape_range, precision=args.precision, backend=args.backend,
           prediction_type=args.prediction_type, overwrite=args.force, clip_skip=args.clip_skip,
           check=not args.no_check, loras=args.lora, controlnets=controlnets,
           tensorrt_options={**trt, "refittable": args.refittable} if args.backend == "tensorrt" else None)
    return 0


def _generate(args) -> int:
    from rtsd.cli_checks import check_image_outputs
    from rtsd.runtime import Runtime

    if args.mask is not None and args.image is None:
        raise ValueError("--mask needs --image: the image to inpaint (white mask pixels are repainted)")
    if args.strength is not None and args.image is None:
        raise ValueError("--strength needs --image: it sets how much of the init image is repainted")
    check_image_outputs(_output_paths(args.output, max(args.num_images, 1)))
    width, height = _size(args.size, args.image)
    runtime = Runtime(args.engine_dir, backend=args.backend, verify=not args.no_verify)
    if args.embeddings_dir:
        runtime.load_textual_inversions(args.embeddings_dir)
    for path in args.embedding:
        runtime.load_textual_inversion(path)
    result = runtime.generate(args.prompt, args.negative, steps=args.steps, guidance_scale=args.cfg, height=height,
                              width=width, seed=args.seed, scheduler=args.scheduler, num_images=args.num_images,
                              image=args.image, mask_image=args.mask, strength=args.strength,
                              callback=_progress_bar(args.steps), loras=dict(args.lora) if args.lora else None,
                              prompt_syntax="plain" if args.plain_prompt else "a1111",
                              controlnets=[_control_arg(c) for c in args.control] or None,
                              control_guidance_start=args.control_start, control_guidance_end=args.control_end,
                              guess_mode=args.guess_mode)
    for path, image in zip(_output_paths(args.output, len(result.images)), result.images):
        save_png(image, path, result.parameters)
        print(f"wrote {path}")
    print(f"seed {result.seed}; " + ", ".join(f"{k} {v:.3f} s" for k, v in result.timings.items()))
    return 0


def _control_arg(text: str) -> tuple[str, Path, float]:
    """NAME=IMAGE[:SCALE] -> (name, image path, scale); a trailing ':x' that is not a number belongs to the path."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--control takes NAME=IMAGE[:SCALE] (e.g. canny=edges.png:0.8), got {text!r}")
    path, colon, scale = rest.rpartition(":")
    try:
        return (name, Path(path), float(scale)) if colon else (name, Path(rest), 1.0)
    except ValueError:
        return name, Path(rest), 1.0


def _parity(args) -> int:
    from rtsd.cli_checks import check_file_output
    from rtsd.export.parity import check_engine_dir

    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1 for the end-to-end check, got {args.steps}")
    if args.json:
        check_file_output(args.json, "--json")
    from rtsd.export.controlnet import parse_pair

    controlnets = dict(parse_pair(p, "--controlnet") for p in args.controlnet)
    report = check_engine_dir(args.engine_dir, args.checkpoint, backend=args.backend, steps=args.steps,
                              controlnets=controlnets, progress=None)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.passed else 1


def _info(args) -> int:
    if (args.path / "manifest.json").is_file():
        from rtsd.export.manifest import Manifest

        info = Manifest.read(args.path).to_dict()
        for record in info["components"].values():  # one line per weights map, not thousands (--json has all)
            if "weights_map" in record and not args.json:
                record["weights_map"] = f"{len(record['weights_map']['weights'])} LoRA-addressable weights"
    else:
        from rtsd.checkpoint import open_checkpoint, summarize

        info = summarize(open_checkpoint(args.path))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_tree(info)
    return 0


def _demo(args) -> int:
    import time

    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange
    from rtsd.models.synthetic import write_checkpoint
    from rtsd.runtime import Runtime

    start = time.perf_counter()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = write_checkpoint(work / "tiny.safetensors", preset="tiny", seed=0)
    print(f"wrote a tiny random-weight SD 1.x checkpoint: {checkpoint}")
    engines = export(checkpoint, work / "engines", shape_range=ShapeRange(min_size=128, max_size=512, opt_size=256,
                                                                          max_batch=2), overwrite=True)
    result = Runtime(engines, backend="onnxruntime").generate(
        "a watercolor painting of a lighthouse at dawn", steps=args.steps, height=256, width=256, seed=0,
        callback=_progress_bar(args.steps))
    path = work / "demo.png"
    save_png(result.images[0], path, result.parameters)
    print(f"demo image (random weights, so expect colourful noise): {path.resolve()}")
    print(f"demo finished in {time.perf_counter() - start:.1f} s; with a real checkpoint: "
          f"rtsd export --checkpoint sd.safetensors --output engines && rtsd generate engines \"a prompt\"")
    return 0


def _lora_arg(text: str) -> tuple[str, float]:
    """PATH[:SCALE] -> (path, scale); a Windows drive letter or a path with ':' keeps working when no scale follows."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def save_png(image, path: Path, parameters: dict) -> None:
    """Save with the generation parameters in a PNG text chunk, so the image says how it was made."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)


def _size(text: str | None, image: Path | None) -> tuple[int | None, int | None]:
    if text is None:
        if image is None:
            return None, None  # the engine directory's default size (SD 1.x/2.x 512, SDXL 1024)
        from PIL import Image

        try:
            with Image.open(image) as handle:
                return handle.size
        except (OSError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot read init image {image}: {exc}") from None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 512x768 (width x height), got {text!r}") from None
    return width, height


def _output_paths(path: Path, count: int) -> list[Path]:
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def _progress_bar(steps: int):
    from tqdm import tqdm

    bar = None

    def update(index: int, total: int, timestep: float, latents) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="denoising", unit="step")
        bar.update(1)
        if index + 1 == total:
            bar.close()

    return update


def _print_tree(data, indent: int = 0) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            print(" " * indent + f"{key}:")
            _print_tree(value, indent + 2)
        else:
            print(" " * indent + f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
