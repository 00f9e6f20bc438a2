"""How far plain fp16 arithmetic lands from fp32 on a checkpoint's UNet, in PyTorch alone (no ONNX, no engine).

    python benchmarks/sdxl_fp16_error.py CHECKPOINT

Runs the reference UNet in fp16 and then in fp32 on the inputs the export's parity check uses (2 rows, 64x64 px,
same seed) and prints rel. L2 and cosine. On the full-size synthetic SDXL (random weights) this is the yardstick for
the fp16 engine's figure in the export's parity check: an engine cannot be expected to beat fp16 arithmetic itself.
Needs the fp16 and the fp32 UNet in memory one after the other (~10.3 GB for SDXL).
"""

from __future__ import annotations

import sys

import torch

from rtsd.export.parity import compare
from rtsd.export.specs import ShapeRange, specs_for
from rtsd.models import load_checkpoint


def main(checkpoint: str) -> None:
    models = load_checkpoint(checkpoint, dtype=torch.float16)
    models.text_encoder = models.vae = None
    spec = specs_for(models.config, ShapeRange(min_size=64, opt_size=64, max_size=1024, max_batch=1))["unet"]
    rows = 1 * spec.batch_factor
    feeds = spec.sample_inputs(rows, 64, 64, seed=rows + 64 + 64)  # as export/parity.py's check

    def run(dtype):
        args = [torch.from_numpy(feeds[t.name]) for t in spec.inputs]
        args = [a.to(dtype) if a.is_floating_point() else a for a in args]
        names = [t.name for t in spec.inputs]
        added = args[3:5] if "text_embeds" in names else []
        with torch.inference_mode():
            return models.unet(*args[:3], *added).float().numpy()

    half = run(torch.float16)
    models.unet.float()
    metrics = compare(half, run(torch.float32))
    print(f"{models.config.family} UNet, torch fp16 vs fp32, {'x'.join(map(str, feeds['sample'].shape))}: "
          f"rel_l2 {metrics.rel_l2:.3e} cosine {metrics.cosine:.6f}")


if __name__ == "__main__":
    main(sys.argv[1])
