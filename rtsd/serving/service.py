"""One replica's request handling, independent of the serving engine: parse (protocol), batch and run (batching),
answer with per-request timings, log one line per request. Ray Serve's app (ray_app.py) only routes HTTP to it.

Every handler returns ``(HTTP status, JSON body)``: 200 with the API's response, 4xx with ``{"error": {"message"}}``
for a request rtsd refuses (one line naming the problem and the fix), 500 for a failure inside the engines; the
replica keeps serving after either.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rtsd.errors import RtsdError
from rtsd.serving import protocol
from rtsd.serving.batching import Batcher

log = logging.getLogger("rtsd.serving")


class ImageService:
    def __init__(self, runtime, max_batch: int | None = None, batch_wait_ms: float = 20.0,
                 model_name: str | None = None, node: str = ""):
        self.runtime = runtime
        engine_max = runtime.shape_range.max_batch
        self.max_batch = min(max_batch or engine_max, engine_max)
        self.model_name = model_name or (Path(runtime.engine_dir).name if runtime.engine_dir else "rtsd")
        self.limits = protocol.EngineLimits.of(runtime, self.model_name)
        self.batcher = Batcher(runtime, self.max_batch, batch_wait_ms / 1000.0)
        self.node = node  # which machine answered (Ray node id): shown in responses

    @classmethod
    def from_engine_dir(cls, engine_dir, backend: str | None = None, threads: int | None = None, **kwargs):
        from rtsd.runtime import Runtime

        chosen = backend
        if backend in (None, "onnxruntime") and threads:
            from rtsd.engine.onnxruntime import OnnxRuntimeBackend

            chosen = OnnxRuntimeBackend(threads=threads)
        return cls(Runtime(engine_dir, backend=chosen), **kwargs)

    async def openai_images(self, body) -> tuple[int, dict]:
        return await self._handle("openai", body, lambda: protocol.parse_openai(body, self.limits),
                                  lambda job, images, info: protocol.openai_response(job, images, info))

    async def txt2img(self, body) -> tuple[int, dict]:
        return await self._handle("txt2img", body, lambda: protocol.parse_a1111(body, self.limits, img2img=False),
                                  lambda job, images, info: protocol.a1111_response(job, body, images, info))

    async def img2img(self, body) -> tuple[int, dict]:
        return await self._handle("img2img", body, lambda: protocol.parse_a1111(body, self.limits, img2img=True),
                                  lambda job, images, info: protocol.a1111_response(job, body, images, info))

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "backend": self.runtime.backend_name,
                "max_batch": self.max_batch, "node": self.node}

    async def _handle(self, api: str, body, parse, respond) -> tuple[int, dict]:
        start = time.perf_counter()
        try:
            job = parse()
        except (RtsdError, ValueError, TypeError) as exc:
            log.info("%s 400 %s", api, exc)
            return 400, {"error": {"message": str(exc), "type": "invalid_request_error", "code": 400}}
        try:
            images, reports = await self.batcher.submit(job)
        except (RtsdError, ValueError, TypeError) as exc:  # refused by the runtime's own checks
            log.info("%s 400 %s", api, exc)
            return 400, {"error": {"message": str(exc), "type": "invalid_request_error", "code": 400}}
        except Exception as exc:  # noqa: BLE001 - an engine failure: this request fails, the replica goes on
            log.exception("%s 500 engine failure", api)
            return 500, {"error": {"message": f"generation failed inside the engines: {type(exc).__name__}: {exc}",
                                   "type": "server_error", "code": 500}}
        seconds = time.perf_counter() - start
        info = {"node": self.node, "seconds": round(seconds, 6),
                "queue_seconds": round(seconds - sum(r.seconds for r in reports), 6),
                "batches": [r.as_dict() for r in reports]}
        log.info("%s 200 %d image(s) %dx%d steps=%d %s seeds=%s %.3fs in %d call(s), largest %d image(s)", api,
                 job.n, job.width, job.height, job.steps, job.scheduler, job.seeds, seconds, len(reports),
                 max(r.images for r in reports))
        return 200, respond(job, images, info)

    def close(self) -> None:
        self.batcher.close()
        self.runtime.close()
