"""The Triton Python-backend model: the whole rtsd loop in-process, one ``Runtime`` per model instance.

Triton's dynamic batcher hands ``execute`` several requests at once; their rows become ``ImageJob``s and are
grouped by batch key into ``Runtime.generate`` calls (rtsd.serving.batching), each row keeping its own seeds
(seed + i for its i-th image), so a row's images equal the same request served alone. A row the engines cannot take
gets its own error response; the other requests of the execute() call are still answered.

Inputs per row (see repository.INPUTS): PROMPT, and optionally NEGATIVE_PROMPT, SEED (-1 or absent = random), STEPS
(30), WIDTH / HEIGHT (the engines' opt size), GUIDANCE_SCALE (7.5), SCHEDULER ("dpmpp_2m"), NUM_IMAGES (1).
Outputs per row: IMAGES uint8 [NUM_IMAGES, H, W, 3] and INFO, a JSON string (seeds, timings, batches).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from rtsd.errors import RtsdError
from rtsd.serving.batching import plan_batches, run_units, units_of
from rtsd.serving.protocol import EngineLimits, ImageJob, RequestError, seeds_from

log = logging.getLogger("rtsd.serving")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from rtsd.runtime import Runtime

        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if args.get("model_instance_kind") == "GPU":
            _use_device(int(args.get("model_instance_device_id", 0)))
        self.runtime = Runtime(parameters["engine_dir"])
        self.default_size = int(parameters.get("default_size", self.runtime.shape_range.opt_size))
        self.max_batch = self.runtime.shape_range.max_batch
        self.limits = EngineLimits.of(self.runtime, config["name"])

    def execute(self, requests: list) -> list:
        start = time.perf_counter()
        rows: list[tuple[int, ImageJob]] = []  # (request index, job) per request row
        errors: dict[int, tuple[str, bool]] = {}  # request index -> (message, the request's own fault)
        for r, request in enumerate(requests):
            try:
                rows.extend((r, job) for job in self._jobs(request))
            except (RequestError, ValueError, TypeError) as exc:
                errors[r] = (str(exc), True)
        units = [unit for _, job in rows for unit in units_of(job)]
        images: dict[int, list] = {}  # id(job) -> images
        reports: dict[int, dict] = {}  # id(job) -> batch reports
        for planned in plan_batches(units, self.max_batch):
            for unit, (image, report) in zip(planned, run_units(self.runtime, planned)):
                if isinstance(report, Exception):
                    user_error = isinstance(report, (RtsdError, ValueError, TypeError))
                    errors[next(r for r, job in rows if job is unit.job)] = (str(report), user_error)
                    continue
                images.setdefault(id(unit.job), []).append(np.asarray(image))
                reports.setdefault(id(unit.job), {})[report.batch_id] = report.as_dict()
        responses = []
        for r in range(len(requests)):
            if r in errors:
                message, user_error = errors[r]  # INVALID_ARG is HTTP 400; INTERNAL (an engine failure) is 500
                code = pb_utils.TritonError.INVALID_ARG if user_error else pb_utils.TritonError.INTERNAL
                error = pb_utils.TritonError(message, code)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            jobs = [job for q, job in rows if q == r]
            stacked = np.stack([np.stack(images[id(job)]) for job in jobs]).astype(np.uint8)
            info = [json.dumps({"seeds": job.seeds, "batches": list(reports[id(job)].values()),
                                "seconds": round(time.perf_counter() - start, 6)}) for job in jobs]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("IMAGES", stacked),
                pb_utils.Tensor("INFO", np.array([[s.encode()] for s in info], dtype=object))]))
        log.info("execute: %d request(s), %d row(s), %d image(s), %.3fs", len(requests), len(rows), len(units),
                 time.perf_counter() - start)
        return responses

    def _jobs(self, request) -> list[ImageJob]:
        """The request's rows as jobs; rows of one request must agree on size and image count (one output tensor)."""
        prompts = _column(request, "PROMPT")
        if prompts is None:
            raise RequestError("PROMPT is required")
        rows = len(prompts)

        def value(name, default, kind):
            column = _column(request, name)
            return [default] * rows if column is None else [kind(v) for v in column]

        text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
        size = self.default_size
        columns = zip([text(p) for p in prompts], value("NEGATIVE_PROMPT", "", text), value("SEED", -1, int),
                      value("STEPS", 30, int), value("WIDTH", size, int), value("HEIGHT", size, int),
                      value("GUIDANCE_SCALE", 7.5, float), value("SCHEDULER", "dpmpp_2m", text),
                      value("NUM_IMAGES", 1, int))
        jobs = []
        for prompt, negative, seed, steps, width, height, guidance, scheduler, n in columns:
            if not 1 <= n <= 16:
                raise RequestError(f"NUM_IMAGES must be between 1 and 16, got {n}")
            jobs.append(self.limits.check(ImageJob(prompt, negative, seeds_from(seed, n), width, height, steps,
                                                   guidance, scheduler)))
        if len({(j.n, j.width, j.height) for j in jobs}) > 1:
            raise RequestError("rows of one request must share NUM_IMAGES, WIDTH and HEIGHT; send separate requests")
        return jobs

    def finalize(self) -> None:
        self.runtime.close()


def _column(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1).tolist()


def _use_device(device_id: int) -> None:
    """Make the instance's GPU current before the engines load (TensorRT backend uses CuPy's current device)."""
    try:
        import cupy

        cupy.cuda.Device(device_id).use()
    except ImportError:  # ONNX Runtime's CUDA provider picks device 0; one instance per GPU via instance_group
        pass
