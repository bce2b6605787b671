"""int8 (ONNX Runtime static quantisation) against fp32 ONNX Runtime on this CPU, measured side by side.

    python benchmarks/precision_cpu.py                                  # R50 at 256x512, 4 calibration images
    python benchmarks/precision_cpu.py --height 512 --width 1024 --iters 5

One run: a DeepLabV3+ checkpoint (random weights, BN statistics from a few forward passes; see below) goes through
``agmm-export --precision int8`` (model.onnx + model.int8.onnx, parity against PyTorch), then both ONNX
models are timed round-robin at batch 1 (agmm-bench's ``time_interleaved``: one call each in turn, so load from
other processes falls on both alike) and the speed-up of int8 over fp32 is printed with the parity figures.
Random weights say nothing about accuracy: the parity table's argmax agreement is a smoke test here, the gates
are meaningful on a trained model with labelled --parity-images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agmm_deploy.checkpoint import save_checkpoint  # noqa: E402
from agmm_deploy.cli.bench import time_interleaved  # noqa: E402
from agmm_deploy.cli.export import main as export_main  # noqa: E402
from agmm_deploy.contract import ModelMeta  # noqa: E402
from agmm_deploy.export.parity import generated_images  # noqa: E402
from agmm_deploy.model import DeepLabV3Plus, ModelConfig  # noqa: E402
from agmm_deploy.runtime import load_runner  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("precision_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--calib", type=int, default=4, help="calibration images")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per model")
    parser.add_argument("--work", type=Path, default=None, help="folder for the artifacts (default: a temp dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.manual_seed(0)
    work = args.work or Path(tempfile.mkdtemp(prefix="precision-cpu-"))
    size = (args.height, args.width)
    meta = ModelMeta.for_dataset("cityscapes", size)
    model = DeepLabV3Plus(ModelConfig.cityscapes(backbone=args.backbone))
    with torch.no_grad():  # BN running statistics away from identity, as a trained model has
        model.train()
        for _ in range(2):
            model(torch.from_numpy(generated_images(meta, 2, (128, 256), seed=1)).permute(0, 3, 1, 2).float() / 64)
    ckpt = save_checkpoint(work / "model.pt", model.eval(), meta)
    calib = work / "calib"
    calib.mkdir(exist_ok=True)
    for i, image in enumerate(generated_images(meta, args.calib, size, seed=2)):
        Image.fromarray(image).save(calib / f"{i}.png")

    start = time.perf_counter()
    code = export_main([str(ckpt), "--out", str(work / "export"), "--precision", "int8", "--calib-images",
                        str(calib), "--device", "cpu", "--parity-batch", "1"])
    print(f"agmm-export --precision int8: exit {code} in {time.perf_counter() - start:.0f} s")
    if code != 0:
        print("the export or its parity failed (see above); nothing timed")
        return code
    runners = [load_runner(work / "export" / name, device="cpu") for name in ("model.onnx", "model.int8.onnx")]
    images = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    (fp32_ms, _, calls), (int8_ms, _, _) = time_interleaved(runners, images, args.iters, warmup=1, max_seconds=120)
    print(f"\n{args.backbone} {args.height}x{args.width}, batch 1, {torch.get_num_threads()} threads, {calls} calls "
          "each, round-robin")
    print(f"{'model':<18} {'backend':<16} {'precision':<9} {'p50 ms':>8}")
    for runner, ms in zip(runners, (fp32_ms, int8_ms)):
        print(f"{runner.path.name:<18} {runner.backend:<16} {runner.precision:<9} {ms:>8.1f}")
    print(f"int8 / fp32 speed-up: {fp32_ms / int8_ms:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
