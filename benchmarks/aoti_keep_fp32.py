"""Which modules an fp16/bf16 AOTInductor package must keep in float32: argmax agreement with the fp32 model.

Runs agmm_deploy.export.aoti.CastModel (the module a package compiles) eagerly on the CPU at bf16 and fp16, with
the float32 islands of KEEP_FP32_MODULES, each alone, and none, on a checkpoint and a few images; prints one line
per (precision, kept modules). Eager CPU bf16/fp16 is slow without native support (minutes per line at 128x256
on 2 AVX2 cores); the compiled CUDA package computes the same ops with other kernels, so this measures the
rounding, not the speed.

    python benchmarks/aoti_keep_fp32.py best.pt "val/*/*.png" --height 128 --width 256
"""

from __future__ import annotations

import argparse
import glob

import numpy as np
import torch
from PIL import Image

from agmm_deploy.checkpoint import load_model
from agmm_deploy.export.aoti import KEEP_FP32_MODULES, CastModel
from agmm_deploy.transforms import normalize


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("aoti_keep_fp32", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="our .pt checkpoint")
    parser.add_argument("images", help="a glob of images, e.g. 'val/*/*.png' (quoted)")
    parser.add_argument("--count", type=int, default=2, help="at most this many images")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    loaded = load_model(args.checkpoint)
    files = sorted(glob.glob(args.images))[:args.count]
    if not files:
        raise SystemExit(f"aoti_keep_fp32: no image matches {args.images!r}; expected a glob of image files")
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((args.width, args.height))) for f in files])
    x = torch.from_numpy(normalize(images, loaded.meta.mean, loaded.meta.std))
    model = loaded.model.eval()
    with torch.no_grad():
        reference = model(x)  # (N, K, H, W) float32
    print(f"{args.checkpoint}: {len(files)} image(s) at {args.height}x{args.width}; argmax agreement with fp32")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for keep in (KEEP_FP32_MODULES, *((m,) for m in KEEP_FP32_MODULES), ()):
            with torch.no_grad():
                logits = CastModel(model, dtype, channels_last=False, keep_fp32=keep)(x)
            agreement = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
            print(f"{name}  keep fp32: {'+'.join(keep) or 'none':22s} argmax {100 * agreement:7.3f} %  "
                  f"max |logit diff| {(logits - reference).abs().max():.4f}", flush=True)


if __name__ == "__main__":
    main()
