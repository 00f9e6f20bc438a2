"""Request batching and the API translation, without a serving engine: per-image seeds make a batched image equal
the same request run alone (bit for bit on ONNX Runtime, down to the float latents), the Batcher forms batches of
concurrent requests and isolates a failing one, and bad requests are refused with one line before any engine runs."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from serving_helpers import SIZE, STEPS, array_to_b64, b64_to_array, runtime  # noqa: F401 (fixture)


def _latents(runtime, *args, **kwargs):
    """Final latents (float32, every row) and images of one generate call."""
    seen = {}

    def keep(i, total, t, x):
        seen["x"] = np.array(x)

    result = runtime.generate(*args, callback=keep, steps=STEPS, height=SIZE, width=SIZE, **kwargs)
    return seen["x"], [np.asarray(im) for im in result.images]


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a"])  # deterministic, and one drawing per-step noise
def test_batched_rows_equal_solo_bit_for_bit(runtime, scheduler):
    prompts, negatives, seeds = ["a cat", "a dog"], ["", "blurry"], [3, 4]
    batched_x, batched_images = _latents(runtime, prompts, negatives, seeds=seeds, scheduler=scheduler)
    for row, (prompt, negative, seed) in enumerate(zip(prompts, negatives, seeds)):
        solo_x, solo_images = _latents(runtime, prompt, negative, seed=seed, scheduler=scheduler)
        assert np.array_equal(batched_x[row], solo_x[0])  # float32 latents, exactly
        assert np.array_equal(batched_images[row], solo_images[0])
    assert np.abs(batched_images[0].astype(int) - batched_images[1]).mean() > 5  # rows really differ


def test_seeds_argument_checks(runtime):
    with pytest.raises(ValueError, match="one per image"):
        runtime.generate("x", seeds=[1, 2], steps=1, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="not both"):
        runtime.generate("x", seed=1, seeds=[1], steps=1, height=SIZE, width=SIZE)


def _job(limits, prompt, seed, n=1, **body):
    from rtsd.serving.protocol import parse_openai

    return parse_openai({"prompt": prompt, "n": n, "seed": seed, "size": f"{SIZE}x{SIZE}", "steps": STEPS, **body},
                        limits)


def test_batcher_groups_concurrent_requests_and_keeps_their_images(runtime):
    from rtsd.serving.batching import Batcher
    from rtsd.serving.protocol import EngineLimits

    limits = EngineLimits.of(runtime, "tiny")
    jobs = [_job(limits, "a red house", 10, n=2), _job(limits, "a blue house", 20),
            _job(limits, "a green house", 30, scheduler="euler"),  # another key: its own call
            _job(limits, "a white house", 40)]

    async def serve_all():
        batcher = Batcher(runtime, max_batch=2, wait_s=0.5)
        try:
            return await asyncio.gather(*(batcher.submit(job) for job in jobs))
        finally:
            batcher.close()

    results = asyncio.run(serve_all())
    calls = {r.batch_id: r for _, reports in results for r in reports}
    assert sorted((r.images, r.jobs) for r in calls.values()) == [(1, 1), (2, 1), (2, 2)]
    for job, (images, _) in zip(jobs, results):
        extra = {"scheduler": "euler"} if job.scheduler == "euler" else {}
        for image, seed in zip(images, job.seeds):
            alone = runtime.generate(job.prompt, seed=seed, steps=STEPS, height=SIZE, width=SIZE, **extra).images[0]
            assert np.array_equal(np.asarray(image), np.asarray(alone))


def test_a_failing_request_does_not_fail_its_batch(runtime):
    from rtsd.serving.batching import run_units, units_of
    from rtsd.serving.protocol import EngineLimits

    class Flaky:  # the real runtime, failing whenever one prompt is in the call (an engine failure)
        def __init__(self, inner):
            self.inner = inner

        def generate(self, prompt, *args, **kwargs):
            if "explode" in prompt:
                raise RuntimeError("engine failure")
            return self.inner.generate(prompt, *args, **kwargs)

    limits = EngineLimits.of(runtime, "tiny")
    good, bad = _job(limits, "a calm lake", 1), _job(limits, "explode", 2)
    outcomes = run_units(Flaky(runtime), units_of(good) + units_of(bad))
    (image, report), (none, error) = outcomes
    assert report.jobs == 1 and none is None and isinstance(error, RuntimeError)
    alone = runtime.generate("a calm lake", seed=1, steps=STEPS, height=SIZE, width=SIZE).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(alone))


def test_service_status_codes(runtime):
    from rtsd.serving.service import ImageService

    service = ImageService(runtime, max_batch=2, batch_wait_ms=1)
    init = array_to_b64(np.full((SIZE, SIZE, 3), 128, np.uint8), prefix="data:image/png;base64,")
    cases = [
        (service.openai_images({"prompt": "x", "size": "2048x2048"}), 400, "outside the exported range"),
        (service.openai_images({"prompt": "x", "response_format": "url"}), 400, "use response_format='b64_json'"),
        (service.openai_images({"n": 1}), 400, "'prompt' is required"),
        (service.txt2img({"prompt": "x", "sampler_name": "Euler z", "width": SIZE, "height": SIZE}), 400,
         "unknown sampler_name 'Euler z'"),
        (service.img2img({"init_images": ["@@@"], "width": SIZE, "height": SIZE}), 400, "not valid base64"),
        (service.img2img({"init_images": [base64.b64encode(b"not a picture").decode()], "width": SIZE,
                          "height": SIZE}), 400, "not a readable image"),
        (service.txt2img({"prompt": "x", "seed": -2, "width": SIZE, "height": SIZE}), 400, "seed must be -1"),
        (service.txt2img({"prompt": "x", "steps": "many", "width": SIZE, "height": SIZE}), 400,
         "'steps' must be an integer"),
    ]

    async def run_all():
        answers = [await call for call, _, _ in cases]
        ok = await service.img2img({"init_images": [init], "prompt": "x", "steps": 2, "seed": 3, "width": SIZE,
                                    "height": SIZE, "denoising_strength": 0.5, "sampler_name": "DPM++ 2M Karras"})
        return answers, ok

    answers, (status, body) = asyncio.run(run_all())
    for (status_code, payload), (_, expected_status, message) in zip(answers, cases):
        assert status_code == expected_status and message in payload["error"]["message"], payload
        assert "\n" not in payload["error"]["message"]
    assert status == 200 and len(body["images"]) == 1
    expected = runtime.generate("x", seed=3, steps=2, height=SIZE, width=SIZE, guidance_scale=7.0,
                                scheduler="dpmpp_2m", scheduler_options={"use_karras_sigmas": True},
                                image=np.full((SIZE, SIZE, 3), 128, np.uint8), strength=0.5).images[0]
    assert np.array_equal(b64_to_array(body["images"][0]), np.asarray(expected))
    service.batcher.close()


def test_serve_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    from rtsd.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2  # before any Ray starts
    err = capsys.readouterr().err.strip()
    assert err.startswith("rtsd serve: error:") and "\n" not in err
    assert main(["serve", str(tmp_path), "--replicas", "0"]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path), "--autoscale", "3,1"])
    assert exit_.value.code == 2
