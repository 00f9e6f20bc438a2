"""``rtsd serve`` and ``rtsd triton-repo``: registered on the main parser by ``add_commands`` (rtsd/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rtsd.errors import MissingDependencyError


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve an engine directory over HTTP (OpenAI Images and A1111 APIs) on Ray Serve")
    p.add_argument("engine_dir", type=Path)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", type=_min_max, metavar="MIN,MAX", help="autoscale between MIN and MAX replicas")
    p.add_argument("--max-batch", type=int, default=None,
                   help="most images per generate call (default and upper bound: the engines' max batch); "
                        "1 = no batching")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long the oldest queued request waits for others to share its call")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None,
                   help="join an existing Ray cluster (HOST:6379 or 'auto'); default: start a local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray this command starts")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPU cores per ONNX Runtime (CPU) replica")
    p.add_argument("--backend", choices=("tensorrt", "onnxruntime"), default=None,
                   help="default: TensorRT (one GPU per replica) when the directory has plans, "
                        "else ONNX Runtime on CPU")
    p.add_argument("--proxy-location", choices=("EveryNode", "HeadOnly"), default="EveryNode",
                   help="where Ray Serve runs HTTP proxies")
    p.set_defaults(run=_serve)

    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository for an engine directory")
    p.add_argument("engine_dir", type=Path)
    p.add_argument("output", type=Path, help="model repository to create")
    p.add_argument("--name", default="rtsd", help="model name in the repository")
    p.add_argument("--instances", type=int, default=1, help="model instances per GPU")
    p.add_argument("--kind", choices=("KIND_GPU", "KIND_CPU"), default=None,
                   help="default: KIND_GPU when the directory has TensorRT plans, else KIND_CPU")
    p.add_argument("--max-queue-delay-us", type=int, default=20000, help="dynamic batching: longest wait for company")
    p.add_argument("--force", action="store_true", help="replace an existing model of that name")
    p.set_defaults(run=_triton_repo)


def _min_max(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (e.g. 1,4), got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"need 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def _serve(args) -> int:
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    if args.max_batch is not None and args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    from rtsd.export.manifest import Manifest

    Manifest.read(args.engine_dir)  # one-line error for a wrong path before Ray starts
    try:
        from rtsd.serving import ray_app
    except ImportError as exc:
        raise MissingDependencyError("ray[serve]", "serve", f"rtsd serve ({exc})") from None
    ray_app.serve_forever(args.engine_dir, host=args.host, port=args.port, address=args.address,
                          num_cpus=args.num_cpus, proxy_location=args.proxy_location, replicas=args.replicas,
                          autoscale=args.autoscale, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                          backend=args.backend, replica_cpus=args.replica_cpus)
    return 0


def _triton_repo(args) -> int:
    from rtsd.serving.triton.repository import write_repository

    model_dir = write_repository(args.engine_dir, args.output, name=args.name, instances=args.instances,
                                 kind=args.kind, max_queue_delay_us=args.max_queue_delay_us, force=args.force)
    print(f"wrote {model_dir} (config.pbtxt, 1/model.py); serve it with: tritonserver --model-repository {args.output}")
    return 0
