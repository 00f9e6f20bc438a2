"""Peak memory and time of exporting the full-size SDXL base UNet (2.57 B parameters) to fp16 ONNX on the CPU.

    flock /work/locks/bigmem python benchmarks/sdxl_fp16_export.py --work /tmp/sdxl-export --json result.json

Writes the synthetic full-size SDXL base checkpoint (fp16, ~6.9 GB; ``rtsd.models.synthetic``), then, in a child
process: loads the reference models in fp16, and exports the UNet with ``rtsd.export.onnx.export_component(...,
precision="fp16")`` (traced in fp16 behind float32 I/O, weights in ``unet.onnx.data``), traced at 64x64 pixels.
The parent samples the child's resident memory every 0.2 s, reads its peak (VmHWM) at the end, and kills it past
``--limit-gb`` so that a shared machine is never pushed into swap or the OOM killer. The ONNX file is then checked
(onnx.checker by path, initializer dtypes). Prints one JSON record; the big files are deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import machine


def _child(work: Path) -> int:
    import torch

    from rtsd.export.onnx import export_component
    from rtsd.export.specs import ShapeRange
    from rtsd.models import load_checkpoint

    start = time.perf_counter()
    models = load_checkpoint(work / "sdxl.safetensors", dtype=torch.float16, device="cpu")
    models.text_encoder = models.vae = None  # only the UNet is exported here
    loaded = time.perf_counter() - start
    files = export_component(models, "unet", work / "unet.onnx", ShapeRange(min_size=64, opt_size=64, max_size=1024),
                             precision="fp16")
    print(json.dumps({"load_seconds": loaded, "total_seconds": time.perf_counter() - start,
                      "files": {f.name: f.stat().st_size for f in files}}), flush=True)
    return 0


def _rss_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="scratch folder (about 14 GB of disk)")
    p.add_argument("--limit-gb", type=float, default=20.0, help="kill the export past this resident memory")
    p.add_argument("--json", help="write the record here too")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the ONNX files")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args.child:
        return _child(work)

    import torch

    from rtsd.models.synthetic import write_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"command": " ".join(["python", *sys.argv]), "machine": machine.describe()}
    if not (work / "sdxl.safetensors").exists():
        start = time.perf_counter()
        write_checkpoint(work / "sdxl.safetensors", "sdxl", seed=0, dtype=torch.float16)
        record["checkpoint_write_seconds"] = time.perf_counter() - start
    record["checkpoint_bytes"] = (work / "sdxl.safetensors").stat().st_size

    child = subprocess.Popen([sys.executable, __file__, "--work", str(work), "--child"], stdout=subprocess.PIPE,
                             text=True)
    peak, killed = [0], [False]

    def watch():
        while child.poll() is None:
            rss = _rss_kib(child.pid, "VmRSS")
            peak[0] = max(peak[0], _rss_kib(child.pid, "VmHWM"), rss)
            if rss > args.limit_gb * 2**20:
                killed[0] = True
                child.kill()
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    start = time.perf_counter()
    watcher.start()
    out, _ = child.communicate()
    watcher.join()
    record.update({"wall_seconds": time.perf_counter() - start, "returncode": child.returncode,
                   "killed_at_limit_gb": args.limit_gb if killed[0] else None,
                   "peak_rss_gib": peak[0] / 2**20})
    if child.returncode == 0:
        record["export"] = json.loads(out.strip().splitlines()[-1])
        import onnx

        onnx.checker.check_model(str(work / "unet.onnx"))
        model = onnx.load(str(work / "unet.onnx"), load_external_data=False)
        types = {}
        for tensor in model.graph.initializer:
            name = onnx.TensorProto.DataType.Name(tensor.data_type)
            types[name] = types.get(name, 0) + 1
        record["onnx"] = {"checker": "passed", "initializer_dtypes": types,
                          "inputs": [(i.name, onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type))
                                     for i in model.graph.input]}
    print(json.dumps(record, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if child.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
