"""Peak memory of ONNX Runtime int8 calibration (agmm_deploy.export.precision.quantize_int8) against the number of
calibration images: it should stay flat, so that int8 can afford enough images to pass its gate.

    python benchmarks/int8_calib_memory.py --work /tmp/calib_mem                       # R50 at 256x512, 2 and 8
    python benchmarks/int8_calib_memory.py --work /tmp/calib_mem --backbone resnet18 --images 2 4 8

A DeepLabV3+ with random weights (memory does not depend on the weights) is exported to ONNX once; then, per
image count, a fresh process runs quantize_int8 on that many random normalised images under ``/usr/bin/time -v``,
whose "Maximum resident set size" is the process's peak. The process also prints its resident set just before
quantize_int8 (imports, the images), so that the table shows what calibration itself added.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("int8_calib_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the fp32 and int8 models")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--images", type=int, nargs="+", default=[2, 8], help="calibration image counts")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one quantisation, internal
    return parser


def export_fp32(work: Path, backbone: str, height: int, width: int) -> Path:
    """A random-weight DeepLabV3+ exported to work/model.onnx (reused when it is already there)."""
    import torch

    from agmm_deploy.contract import ModelMeta
    from agmm_deploy.export.onnx import export_onnx
    from agmm_deploy.model import DeepLabV3Plus, ModelConfig

    path = work / f"model_{backbone}_{height}x{width}.onnx"
    if not path.is_file():
        torch.manual_seed(0)
        model = DeepLabV3Plus(ModelConfig(backbone=backbone, num_classes=19)).eval()
        export_onnx(model, ModelMeta.for_dataset("cityscapes", (height, width)), path, height=height, width=width)
    return path


def quantize_child(onnx_path: Path, count: int, height: int, width: int) -> None:
    """Runs in the measured process: quantize_int8 on ``count`` random normalised images."""
    import numpy as np

    from agmm_deploy.export.precision import quantize_int8

    images = np.random.default_rng(0).standard_normal((count, 3, height, width)).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"rss before quantize_int8: {before:.0f} MiB", flush=True)
    quantize_int8(onnx_path, onnx_path.with_suffix(f".int8_{count}.onnx"), images)


def peak_rss_mib(onnx_path: Path, count: int, height: int, width: int) -> tuple[float, float]:
    """(peak RSS, RSS before quantize_int8) in MiB of a fresh process quantising with ``count`` images."""
    command = ["/usr/bin/time", "-v", sys.executable, __file__, "--work", str(onnx_path.parent), "--child",
               str(count), "--height", str(height), "--width", str(width), "--backbone", onnx_path.name]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"quantising with {count} images failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    before = re.search(r"rss before quantize_int8: (\d+) MiB", done.stdout)
    if peak is None or before is None:
        raise RuntimeError(f"no peak in /usr/bin/time's report:\n{done.stderr[-2000:]}")
    return int(peak.group(1)) / 1024, float(before.group(1))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.child is not None:
        # In the child, --backbone carries the model file's name (see peak_rss_mib).
        quantize_child(args.work / args.backbone, args.child, args.height, args.width)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    onnx_path = export_fp32(args.work, args.backbone, args.height, args.width)
    print(f"{args.backbone} at {args.height}x{args.width}, load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'images':>6} {'peak MiB':>9} {'before MiB':>10} {'added MiB':>9}")
    for count in args.images:
        peak, before = peak_rss_mib(onnx_path, count, args.height, args.width)
        print(f"{count:>6} {peak:>9.0f} {before:>10.0f} {peak - before:>9.0f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
