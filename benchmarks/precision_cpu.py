"""The CPU precision floor in one run: reduced-precision artifacts against ONNX Runtime fp32, with their mIoU deltas.

    python benchmarks/precision_cpu.py --work /tmp/precision                  # R50 at 512x1024, batch 1
    python benchmarks/precision_cpu.py --work /tmp/precision --checkpoint last.pt   # skip the training

1. Unless ``--checkpoint`` is given: a synthetic folder data set at 512x1024 (``python -m training.synthetic``)
   and a brief training of DeepLabV3+ R50 on it (``python -m training.run``, ``--steps`` steps at a small
   crop), so that the model separates the synthetic classes and the mIoU gates mean something.
2. ``agmm-export`` at 512x1024 once per reduced-precision row of this CPU: OpenVINO int8 (NNCF), OpenVINO
   bf16 (refused with its reason on a CPU without native bf16) and ONNX Runtime int8, each against PyTorch on
   the labelled validation images (the parity table and its gates, mIoU delta included).
3. One ``agmm-bench`` run over the fp32 ONNX model and every artifact that passed its gates, timed round-robin,
   ``--baseline onnxruntime``: the ``vs onnxruntim`` column is each artifact's speed-up over ONNX Runtime fp32,
   ``mIoU d`` its delta from parity.json, ``floor ms`` the FLOPs over this CPU's measured GEMM rate.

The machine's load average is printed before and after the timings; on a shared machine the ratios (measured
side by side) are what to read, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agmm_deploy.cli.bench import main as bench_main  # noqa: E402
from agmm_deploy.cli.export import main as export_main  # noqa: E402

# (precision, runtime, output folder, most calibration images or None for --calib): the reduced-precision rows a
# CPU can run. Neither calibration grows with the number of images (quantize_int8 reduces each activation as
# it is made: R50 512x1024 agmm-export with 8 images peaks at 2.6 GiB; NNCF collects statistics as it goes).
ROWS = (("int8", "openvino", "export_int8_ov", None), ("bf16", "openvino", "export_bf16_ov", None),
        ("int8", "onnxruntime", "export_int8_ort", None))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("precision_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the data, checkpoint and artifacts")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint (skips steps 1)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=24, help="training steps (at --crop, batch 2)")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--calib", type=int, default=8, help="calibration images (training images)")
    parser.add_argument("--parity", type=int, default=4, help="labelled validation images for the parity gates")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per artifact")
    return parser


def _python(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def train_briefly(work: Path, backbone: str, steps: int, crop: int, size: tuple[int, int]) -> Path:
    """A synthetic folder data set and a checkpoint trained on it for ``steps`` steps; returns last.pt."""
    data = work / "data"
    if not (data / "val" / "labels").is_dir():
        _python("training.synthetic", "--dataset", "folder", "--out", str(data), "--num-train", "24",
                "--num-val", "8", "--height", str(size[0]), "--width", str(size[1]))
    _python("training.run", "--dataset", "folder", "--data-root", str(data), "--out", str(work / "run"),
            "--backbone", backbone, "--pretrained", "none", "--crop-size", str(crop), "--batch-size", "2",
            "--max-steps", str(steps), "--epochs", "1000", "--workers", "0", "--eval-every", "100000",
            "--max-val-images", "1")
    return work / "run" / "last.pt"


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    size = (args.height, args.width)
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or train_briefly(args.work, args.backbone, args.steps, args.crop, size)
    data = args.work / "data"
    common = [str(checkpoint), "--height", str(args.height), "--width", str(args.width), "--device", "cpu",
              "--calib-images", str(data / "train" / "images"),
              "--parity-images", str(data / "val"), "--parity-count", str(args.parity), "--parity-batch", "1"]
    artifacts: list[Path] = []
    baseline = None
    for precision, runtime, folder, most in ROWS:
        out = args.work / folder
        calib = ["--calib-count", str(min(args.calib, most or args.calib))]
        code = export_main([*common, *calib, "--precision", precision, "--runtime", runtime, "--out", str(out)])
        print(f"agmm-export --precision {precision} --runtime {runtime}: exit {code}", flush=True)
        if not out.is_dir():
            continue  # refused before anything was written (e.g. bf16 on a CPU without it)
        # What passed its gates keeps its name; a failed artifact is model.*.failed and is not timed.
        artifacts += [p for p in sorted(out.iterdir()) if p.suffix in (".xml", ".onnx") and p.name != "model.onnx"]
        baseline = baseline or next((p for p in (out / "model.onnx", out / "model.onnx.failed") if p.is_file()), None)
    if baseline is None or not artifacts:
        print("no fp32 ONNX model or no reduced-precision artifact that passed its gates; nothing to time")
        return 1
    if baseline.suffix == ".failed":
        # The baseline is timed, not deployed: its parity table above says which fp32 gate it missed.
        copy = args.work / "baseline_fp32.onnx"
        shutil.copyfile(baseline, copy)
        print(f"{baseline} failed an fp32 gate (table above); timed as the baseline all the same, as {copy.name}")
        baseline = copy
    print(f"load average before timing: {os.getloadavg()}", flush=True)
    code = bench_main([str(baseline), *map(str, artifacts), "--device", "cpu", "--iters", str(args.iters), "--baseline",
                       "onnxruntime", "--height", str(args.height), "--width", str(args.width)])
    print(f"load average after timing: {os.getloadavg()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
