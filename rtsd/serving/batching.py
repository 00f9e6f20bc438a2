"""Request batching: images of jobs that can share a UNet call (same ``ImageJob.batch_key``: size, steps, scheduler,
guidance, mode) run in one ``Runtime.generate`` call, up to the engines' max batch.

Each image keeps its own seed's noise (``generate(seeds=...)``), so an image generated in a batch equals the same
request run alone: on ONNX Runtime bit for bit (tests/test_serving_batching.py checks it). At most one generation is in
flight per replica (the TensorRT backend shares one activation block): the ``Batcher`` runs its calls one at a time
on one worker thread, and the event loop keeps accepting requests meanwhile.

``plan_batches`` (a list of jobs -> calls) serves engines that hand over requests already gathered (Triton's dynamic
batcher); ``Batcher`` gathers them itself for servers that deliver one request at a time (Ray Serve).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rtsd.serving.protocol import ImageJob

log = logging.getLogger("rtsd.serving")
_batch_ids = itertools.count(1)


@dataclass
class Unit:
    """One image of a job: the job's index ``index`` image, generated from ``seed``."""

    job: ImageJob
    index: int

    @property
    def seed(self) -> int:
        return self.job.seeds[self.index]


@dataclass
class BatchReport:
    """What one generate call did, returned to every job that had images in it (shown in responses)."""

    batch_id: int
    images: int  # images in the call (the UNet batch is twice this with classifier-free guidance)
    jobs: int  # distinct requests in the call
    seconds: float
    timings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"batch_id": self.batch_id, "batch_images": self.images, "batch_requests": self.jobs,
                "batch_seconds": round(self.seconds, 6), "generate_timings": self.timings}


def units_of(job: ImageJob) -> list[Unit]:
    return [Unit(job, i) for i in range(job.n)]


def plan_batches(units: list[Unit], max_batch: int) -> list[list[Unit]]:
    """Group units by batch key in arrival order, then cut each group into calls of at most ``max_batch`` images."""
    groups: dict[tuple, list[Unit]] = {}
    for unit in units:
        groups.setdefault(unit.job.batch_key(), []).append(unit)
    return [group[i:i + max_batch] for group in groups.values() for i in range(0, len(group), max_batch)]


def run_batch(runtime, units: list[Unit]) -> tuple[list, BatchReport]:
    """One ``generate`` call for units sharing a batch key -> (one PIL image per unit, report)."""
    start = time.perf_counter()
    result = runtime.generate([u.job.prompt for u in units], [u.job.negative_prompt for u in units],
                              seeds=[u.seed for u in units], **units[0].job.generate_kwargs())
    report = BatchReport(next(_batch_ids), len(units), len({id(u.job) for u in units}), time.perf_counter() - start,
                         {k: round(v, 6) for k, v in result.timings.items()})
    return result.images, report


def run_units(runtime, units: list[Unit]) -> list[tuple[object, BatchReport | Exception]]:
    """Run one planned call; if it fails with images from several jobs, run each job alone, so a failure is
    reported to the job that caused it and the others still get their images. Returns (image or None, report or
    error) per unit."""
    try:
        images, report = run_batch(runtime, units)
        return [(image, report) for image in images]
    except Exception as exc:  # noqa: BLE001 - handed to the request(s) it belongs to
        jobs = list({id(u.job): u.job for u in units}.values())
        if len(jobs) == 1:
            return [(None, exc)] * len(units)
        by_job = {id(job): run_units(runtime, [u for u in units if u.job is job]) for job in jobs}
        position = {id(job): 0 for job in jobs}
        outcomes = []
        for unit in units:
            outcomes.append(by_job[id(unit.job)][position[id(unit.job)]])
            position[id(unit.job)] += 1
        return outcomes


class Batcher:
    """Gathers units from concurrent requests for up to ``wait_s`` after the oldest arrived (or until a call is
    full), runs them, and resolves each request when all of its images are done. ``max_batch=1`` turns batching off.
    Use from one asyncio event loop."""

    def __init__(self, runtime, max_batch: int, wait_s: float):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.runtime, self.max_batch, self.wait_s = runtime, max_batch, wait_s
        self._pending: list[tuple[Unit, asyncio.Future]] = []
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtsd-generate")  # one in flight

    async def submit(self, job: ImageJob) -> tuple[list, list[BatchReport]]:
        """-> (the job's images in order, the reports of the calls they ran in). Raises what generate raised."""
        loop = asyncio.get_running_loop()
        futures = []
        for unit in units_of(job):
            future = loop.create_future()
            self._pending.append((unit, future))
            futures.append(future)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run_forever())
        outcomes = await asyncio.gather(*futures)
        images, reports = [image for image, _ in outcomes], [report for _, report in outcomes]
        unique = list({r.batch_id: r for r in reports}.values())
        return images, unique

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            units = [unit for unit, _ in batch]
            outcomes = await loop.run_in_executor(self._executor, run_units, self.runtime, units)
            for (_, future), (image, report) in zip(batch, outcomes):
                if future.done():  # the client went away
                    continue
                if isinstance(report, Exception):
                    future.set_exception(report)
                else:
                    future.set_result((image, report))

    async def _gather(self) -> list[tuple[Unit, asyncio.Future]]:
        """Wait until the oldest unit's key has a full call or its wait is over; take that call's units."""
        key = self._pending[0][0].job.batch_key()
        deadline = self._pending[0][0].job.received + self.wait_s
        while self._count(key) < self.max_batch and (remaining := deadline - time.perf_counter()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        taken = [entry for entry in self._pending if entry[0].job.batch_key() == key][:self.max_batch]
        chosen = {id(entry) for entry in taken}
        self._pending = [entry for entry in self._pending if id(entry) not in chosen]
        return taken

    def _count(self, key: tuple) -> int:
        return sum(1 for unit, _ in self._pending if unit.job.batch_key() == key)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
