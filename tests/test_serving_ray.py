"""`rtsd serve` on a real Ray Serve application (CPU, 127.0.0.1, free ports, the tiny engine directory), called with
the official `openai` client and the `webuiapi` A1111 client; then a two-node Ray cluster on this machine, one replica
per node. Every image is compared with a direct `Runtime.generate` of the same prompt and seed in this process.

Needs the `serve` extra (ray[serve]) and the test clients (openai, webuiapi, psutil); skipped with the reason where
they are missing. Both tests tear Ray down and assert that none of its processes is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving_helpers import (SIZE, STEPS, b64_to_array, free_port, kill_all, ray_processes,  # noqa: F401
                             runtime, solo, wait_gone)

from tests.optional import require  # noqa: E402  (skips outside CI, fails in CI: the dev extra installs these)

require("ray.serve")
openai = require("openai")
webuiapi = require("webuiapi")
psutil = require("psutil")




def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"rtsd serve exited early with status {server.returncode}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise AssertionError(f"rtsd serve did not become healthy within {timeout:.0f}s")


def test_rtsd_serve_openai_and_a1111_clients(tiny_engine_dir, runtime, tmp_path_factory):
    ray_tmp = str(tmp_path_factory.mktemp("ray"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    server = subprocess.Popen(
        [sys.executable, "-m", "rtsd.cli", "serve", str(tiny_engine_dir), "--port", str(port), "--num-cpus", "2",
         "--max-batch", "2", "--batch-wait-ms", "500"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    family = []
    try:
        wait_healthy(url, server)
        family = psutil.Process(server.pid).children(recursive=True)  # raylet, gcs_server, workers, replicas
        assert family, "Ray's processes should be children of rtsd serve"

        # 1. The official openai client, n=2: image i uses seed + i.
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        response = client.images.generate(prompt="a red fox", model=tiny_engine_dir.name, n=2, size=f"{SIZE}x{SIZE}",
                                          response_format="b64_json", extra_body={"seed": 11, "steps": STEPS})
        got = [b64_to_array(d.b64_json) for d in response.data]
        assert np.array_equal(got[0], solo(runtime, "a red fox", 11))
        assert np.array_equal(got[1], solo(runtime, "a red fox", 12))
        assert np.abs(got[0].astype(int) - got[1]).mean() > 5  # the seeds matter: not a constant image
        assert response.model_extra["rtsd"]["seeds"] == [11, 12]

        # 2. An A1111 client: txt2img (batch_size 2, "Euler a", cfg 6) and img2img from the first image.
        a1111 = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        r = a1111.txt2img(prompt="a castle", negative_prompt="fog", width=SIZE, height=SIZE, steps=STEPS, seed=21,
                          batch_size=2, cfg_scale=6, sampler_name="Euler a")
        assert r.info["all_seeds"] == [21, 22]
        for image, seed in zip(r.images, (21, 22)):
            expected = solo(runtime, "a castle", seed, negative_prompt="fog", guidance_scale=6.0, scheduler="euler_a")
            assert np.array_equal(np.asarray(image), expected)
        init = np.asarray(r.images[0])
        r = a1111.img2img(images=[r.images[0]], prompt="a castle at night", width=SIZE, height=SIZE, steps=STEPS,
                          seed=31, cfg_scale=7.5, sampler_name="DPM++ 2M", denoising_strength=0.7)
        expected = solo(runtime, "a castle at night", 31, image=init, strength=0.7)
        assert np.array_equal(np.asarray(r.images[0]), expected)
        assert np.abs(expected.astype(int) - solo(runtime, "a castle at night", 31)).mean() > 5  # the init image counts
        assert [s["name"] for s in a1111.get_samplers()][:2] == ["Euler", "Euler a"]

        # 3. 8 concurrent requests: batches form (shown by the responses) and each image equals its solo result.
        def one(i):
            return client.images.generate(prompt=f"a lighthouse {i}", n=1, size=f"{SIZE}x{SIZE}",
                                          extra_body={"seed": 100 + i, "steps": STEPS})

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(one, range(8)))
        shared = [b for resp in responses for b in resp.model_extra["rtsd"]["batches"] if b["batch_requests"] > 1]
        assert shared, "no two concurrent requests shared a generate call"
        assert max(b["batch_images"] for b in shared) == 2  # the engines' max batch
        for i, resp in enumerate(responses):
            assert np.array_equal(b64_to_array(resp.data[0].b64_json), solo(runtime, f"a lighthouse {i}", 100 + i))

        # 4. Bad requests: 400 with rtsd's one-line message; the replica keeps serving.
        with pytest.raises(openai.BadRequestError, match="outside the exported range"):
            client.images.generate(prompt="x", size="1024x1024", extra_body={"steps": STEPS})
        request = urllib.request.Request(url + "/sdapi/v1/img2img", method="POST",
                                         data=json.dumps({"init_images": ["not base64!"], "width": SIZE,
                                                          "height": SIZE}).encode())
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=60)
        assert error.value.code == 400 and "not valid base64" in error.value.read().decode()
        assert a1111.txt2img(prompt="still up", width=SIZE, height=SIZE, steps=1, seed=1).images
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            output, _ = server.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
        left = wait_gone(family) + ray_processes(ray_tmp)
        kill_all(left)
    assert server.returncode == 0, output[-3000:]
    assert output.count("openai 200 1 image(s) 128x128") >= 8  # one log line per request
    assert not left, f"Ray processes left behind: {[p.pid for p in left]}"


def test_two_node_cluster_one_replica_per_node(tiny_engine_dir, runtime, tmp_path_factory, monkeypatch):
    """Scale-out: two Ray nodes on this machine (what `ray start --head` + `ray start --address=HEAD:6379` give),
    one CPU each, two replicas: requests are answered by both nodes, with the right images."""
    import ray
    from ray.cluster_utils import Cluster

    from rtsd.serving import ray_app

    ray_tmp = str(tmp_path_factory.mktemp("ray2"))
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # Ray rewrites a 127.0.0.1 bootstrap address to the machine's outward IP unless clusters are "disabled" (its
    # loopback mode); the nodes listen on 127.0.0.1 only, so keep the driver there too.
    import ray._private.ray_constants as ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    before = set(p.pid for p in psutil.Process().children(recursive=True))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    family = []
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address="127.0.0.1:" + cluster.address.rsplit(":", 1)[1])  # the head's GCS listens on 127.0.0.1
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        port = free_port()
        ray_app.start(tiny_engine_dir, port=port, proxy_location="HeadOnly", replicas=2, replica_cpus=1,
                      max_batch=1)
        family = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)

        def one(i):
            return client.images.generate(prompt=f"a bridge {i}", size=f"{SIZE}x{SIZE}",
                                          extra_body={"seed": 200 + i, "steps": STEPS})

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(one, range(6)))
        nodes = {resp.model_extra["rtsd"]["node"] for resp in responses}
        assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}, "both nodes should answer"
        for i, resp in enumerate(responses):
            assert np.array_equal(b64_to_array(resp.data[0].b64_json), solo(runtime, f"a bridge {i}", 200 + i))
    finally:
        try:
            ray_app.stop()
        finally:
            cluster.shutdown()
        left = wait_gone(family) + ray_processes(ray_tmp)
        kill_all(left)
    assert not left, f"Ray processes left behind: {[p.pid for p in left]}"
