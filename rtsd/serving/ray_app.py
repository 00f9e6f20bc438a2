"""``rtsd serve``: an engine directory behind the OpenAI Images and A1111 APIs on Ray Serve.

Ray Serve does the HTTP proxy, routing, replicas, autoscaling and metrics; each replica holds one ``Runtime`` and one
``ImageService`` (request parsing and batching, no Ray in it). TensorRT engine directories get one replica per GPU
(``num_gpus=1``); ONNX directories run CPU replicas (``--replica-cpus`` cores each). Joining an existing cluster
(``--address``) is how it scales past one machine: every machine runs ``ray start --address=HEAD:6379`` and holds the
engine directory at the same path, built for its own GPU (the manifest records which GPU and TensorRT version a plan
was built for; a replica refuses a stale plan with the rebuild command).
"""


import json
import logging
import os
import signal
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

api = FastAPI(title="rtsd")


@serve.deployment(name="rtsd")
@serve.ingress(api)
class RtsdDeployment:
    def __init__(self, engine_dir: str, max_batch: int | None, batch_wait_ms: float, backend: str | None,
                 threads: int | None):
        import ray
        from ray.serve import metrics

        from rtsd.serving.service import ImageService

        log = logging.getLogger("rtsd.serving")  # one line per request, into the replica's Serve log
        log.setLevel(logging.INFO)
        log.handlers, log.propagate = logging.getLogger("ray.serve").handlers, False
        node = ray.get_runtime_context().get_node_id()
        self.service = ImageService.from_engine_dir(engine_dir, backend=backend, threads=threads,
                                                    max_batch=max_batch, batch_wait_ms=batch_wait_ms, node=node)
        # Ray Serve exports its own request counts and latencies; these add what only the replica knows.
        self._images = metrics.Counter("rtsd_images_generated", description="images generated",
                                       tag_keys=("api",))
        self._batch = metrics.Histogram("rtsd_batch_images", description="images per generate call",
                                        boundaries=[1, 2, 4, 8, 16, 32])

    async def _answer(self, api_name: str, handler, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"error": {"message": "the request body is not valid JSON", "code": 400}}, 400)
        status, payload = await handler(body)
        if status == 200:
            info = payload.get("rtsd") or json.loads(payload["info"])["rtsd"]
            self._images.inc(len(payload.get("data") or payload.get("images")), tags={"api": api_name})
            for batch in info["batches"]:
                self._batch.observe(batch["batch_images"])
        return JSONResponse(payload, status)

    @api.post("/v1/images/generations")
    async def openai_images(self, request: Request):
        return await self._answer("openai", self.service.openai_images, request)

    @api.post("/sdapi/v1/txt2img")
    async def txt2img(self, request: Request):
        return await self._answer("txt2img", self.service.txt2img, request)

    @api.post("/sdapi/v1/img2img")
    async def img2img(self, request: Request):
        return await self._answer("img2img", self.service.img2img, request)

    @api.get("/sdapi/v1/samplers")
    async def samplers(self):
        from rtsd.serving.protocol import a1111_samplers

        return a1111_samplers()

    @api.get("/health")
    async def health(self):
        return self.service.health()

    def check_health(self) -> None:  # Ray Serve's replica health check
        return None


def build_app(engine_dir, *, replicas: int = 1, autoscale: "tuple[int, int] | None" = None,
              max_batch: "int | None" = None, batch_wait_ms: float = 20.0, backend: str | None = None,
              replica_cpus: float = 1.0):
    """The Serve application for one engine directory (not started)."""
    from rtsd.export.manifest import Manifest
    from rtsd.export.specs import COMPONENTS

    engine_dir = Path(engine_dir).resolve()
    manifest = Manifest.read(engine_dir)  # a missing or unknown directory fails here, on the driver, in one line
    gpu = backend != "onnxruntime" and (
        backend == "tensorrt" or all(manifest.engine_record(c, "tensorrt") for c in COMPONENTS))
    actor = {"num_gpus": 1} if gpu else {"num_cpus": replica_cpus}
    per_call = min(max_batch or manifest.shape_range.max_batch, manifest.shape_range.max_batch)
    # A replica holds one call running and one gathering; more requests wait at Serve's router, which can then give
    # them to another replica (the router prefers replicas on its own node while they have room).
    ongoing = 2 * per_call
    scaling = ({"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                       "target_ongoing_requests": per_call}}
               if autoscale else {"num_replicas": replicas})
    threads = None if gpu else max(1, int(replica_cpus))
    return RtsdDeployment.options(ray_actor_options=actor, max_ongoing_requests=ongoing, **scaling).bind(
        str(engine_dir), max_batch, batch_wait_ms, backend, threads)


def start(engine_dir, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          num_cpus: int | None = None, proxy_location: str = "EveryNode", **app_options) -> None:
    """Connect to (``address``) or start a local Ray, then deploy. Returns once the replicas are up."""
    import ray

    app = build_app(engine_dir, **app_options)
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     _node_ip_address="127.0.0.1")  # a local Ray: nothing reachable from other machines
    serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location)
    serve.run(app, name="rtsd", route_prefix="/", blocking=False)


def stop() -> None:
    """Delete the application and Serve; disconnect from Ray (a local Ray this process started stops with it)."""
    import ray

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(engine_dir, **options) -> None:
    """``rtsd serve``: deploy, print where, and run until SIGINT / SIGTERM; then shut everything down."""
    done = threading.Event()
    try:
        start(engine_dir, **options)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own (aborting) handlers
            signal.signal(sig, lambda *_: done.set())
        host, port = options.get("host", "127.0.0.1"), options.get("port", 8000)
        print(f"rtsd serve: {engine_dir} at http://{host}:{port} (OpenAI: /v1/images/generations, "
              f"A1111: /sdapi/v1/txt2img, /sdapi/v1/img2img); pid {os.getpid()}, Ctrl-C to stop", flush=True)
        done.wait()
    finally:
        stop()
