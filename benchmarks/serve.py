"""Serving throughput and latency: `rtsd serve` (Ray Serve, one replica) under 1, 4 and 16 concurrent clients, with
request batching on (the engines' max batch) and off (--max-batch 1).

    python benchmarks/serve.py                                   # tiny synthetic engine dir, CPU, 128x128, 4 steps
    python benchmarks/serve.py --engine-dir DIR --size 512 --steps 30 --json out.json

Each client is a closed loop: it sends an OpenAI Images request (n=1, its own seed), waits for the answer, sends the
next, for --seconds per level after one warm-up request per client. Reported per level: images/s (completed images /
wall time), latency p50 / p90 / p99 (request sent -> response read, queueing included), and the mean number of
images per generate call (read from the responses, so batching is shown, not assumed). The server runs as a
subprocess on 127.0.0.1 with a local Ray of --num-cpus CPUs and is stopped after each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402


def tiny_engine_dir(workdir: Path, max_batch: int) -> Path:
    from rtsd.export.pipeline import export
    from rtsd.export.specs import ShapeRange
    from rtsd.models.synthetic import write_checkpoint

    engine_dir = workdir / f"tiny-b{max_batch}"
    if not (engine_dir / "manifest.json").exists():
        checkpoint = write_checkpoint(workdir / "tiny.safetensors", "tiny", seed=0)
        export(checkpoint, engine_dir, shape_range=ShapeRange(min_size=128, max_size=256, opt_size=128,
                                                               max_batch=max_batch), progress=None)
    return engine_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def run_level(url: str, clients: int, seconds: float, size: int, steps: int) -> dict:
    latencies, batch_sizes, lock = [], [], threading.Lock()
    stop_at = [0.0]

    def client(c: int) -> None:
        i = 0
        while True:
            body = {"prompt": f"a photo of a lighthouse, client {c}", "n": 1, "size": f"{size}x{size}",
                    "seed": 1000 * c + i, "steps": steps}
            start = time.perf_counter()
            answer = post(url, body)
            took = time.perf_counter() - start
            i += 1
            if stop_at[0] == 0.0:  # warm-up request
                return
            if start >= stop_at[0]:
                return
            with lock:
                latencies.append(took)
                batch_sizes.extend(b["batch_images"] for b in answer["rtsd"]["batches"])

    warm = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    begin = time.perf_counter()
    stop_at[0] = begin + seconds
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return {"clients": clients, "requests": len(ordered), "wall_s": round(wall, 3),
            "images_per_s": round(len(ordered) / wall, 3), "latency_p50_s": round(pct(50), 3),
            "latency_p90_s": round(pct(90), 3), "latency_p99_s": round(pct(99), 3),
            "mean_images_per_call": round(sum(batch_sizes) / max(len(batch_sizes), 1), 2)}


def serve(engine_dir: Path, max_batch: int, wait_ms: float, num_cpus: int, ray_tmp: str):
    port = free_port()
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    server = subprocess.Popen([sys.executable, "-m", "rtsd.cli", "serve", str(engine_dir), "--port", str(port),
                               "--num-cpus", str(num_cpus), "--replica-cpus", str(num_cpus), "--max-batch",
                               str(max_batch), "--batch-wait-ms", str(wait_ms)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"rtsd serve exited with {server.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            return server, url
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit("rtsd serve did not come up in 300 s")


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)  # its own session: Ray's processes with it
        server.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", type=Path, help="default: a tiny synthetic engine dir (max batch 4)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rtsd-serve-bench")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per level")
    parser.add_argument("--max-batch", type=int, default=4, help="batching-on max batch")
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--num-cpus", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    engine_dir = args.engine_dir or tiny_engine_dir(args.workdir, args.max_batch)
    levels = [int(c) for c in args.clients.split(",")]
    report = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "machine": describe(), "engine_dir": str(engine_dir), "size": args.size, "steps": args.steps,
              "seconds_per_level": args.seconds, "batch_wait_ms": args.batch_wait_ms, "modes": {}}
    for mode, max_batch in (("batching_on", args.max_batch), ("batching_off", 1)):
        with tempfile.TemporaryDirectory(prefix="rtsd-ray-") as ray_tmp:
            server, url = serve(engine_dir, max_batch, args.batch_wait_ms, args.num_cpus, ray_tmp)
            try:
                rows = []
                for clients in levels:
                    row = run_level(url + "/v1/images/generations", clients, args.seconds, args.size, args.steps)
                    rows.append(row)
                    print(f"{mode:13s} max_batch={max_batch} clients={clients:3d}  {row['images_per_s']:7.2f} img/s  "
                          f"p50 {row['latency_p50_s']:.3f}s  p90 {row['latency_p90_s']:.3f}s  "
                          f"p99 {row['latency_p99_s']:.3f}s  images/call {row['mean_images_per_call']}", flush=True)
                report["modes"][mode] = {"max_batch": max_batch, "levels": rows}
            finally:
                stop(server)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
