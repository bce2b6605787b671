"""AGMM against partial cross-entropy alone: the same small model, data, seed and steps, two losses.

    python benchmarks/agmm_vs_ce.py                 # 1-5 minutes on 2 CPU cores, depending on load
    python benchmarks/agmm_vs_ce.py --steps 400     # longer, closer to convergence

Writes a synthetic Cityscapes-layout data set with 20 clicks per image, trains DeepLabV3+ ResNet-18 from
scratch twice with ``training.run`` (``--loss agmm`` then ``--loss ce``), evaluates both on the full labels of
the validation images (whole image), and prints the two mIoUs side by side. On a few hundred CPU steps the
difference is noise-sized either way; it is a smoke test of the whole loop, not a reproduction of the paper.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import run, synthetic  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--crop-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--num-train", type=int, default=40)
    p.add_argument("--num-val", type=int, default=10)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="keep data and runs here (default: a temporary folder)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        data = synthetic.generate("cityscapes", out / "data", args.num_train, args.num_val, args.height, args.width,
                                  seed=args.seed, progress=False)
        rows = []
        for loss in ("agmm", "ce"):
            start = time.perf_counter()
            result = run.main([
                "--dataset", "cityscapes", "--clicks", "20", "--data-root", str(data.root), "--out", str(out / loss),
                "--pretrained", "none", "--backbone", args.backbone, "--crop-size", str(args.crop_size), "--batch-size", str(args.batch_size),
                "--lr", str(args.lr), "--head-lr-mult", "1", "--epochs", "1000", "--max-steps", str(args.steps),
                "--eval-mode", "whole", "--eval-every", "1000", "--workers", "0", "--device", "cpu",
                "--seed", str(args.seed), "--loss", loss, "--log-every", "50"])
            rows.append((loss, result.best_miou, result.step, time.perf_counter() - start))

    print(f"\nsynthetic Cityscapes layout, 20 clicks/image, {args.num_train} train / {args.num_val} val images "
          f"{args.height}x{args.width}; DeepLabV3+ {args.backbone} from scratch, crop {args.crop_size}, "
          f"batch {args.batch_size}, lr {args.lr}, seed {args.seed}")
    print(f"{'loss':<26}{'steps':>7}{'mIoU (%)':>11}{'seconds':>10}")
    for loss, miou, steps, seconds in rows:
        name = "AGMM (seg+cls+proto+gmm)" if loss == "agmm" else "partial CE only"
        print(f"{name:<26}{steps:>7}{miou:>11.2f}{seconds:>10.0f}")
    print(f"AGMM - CE: {rows[0][1] - rows[1][1]:+.2f} mIoU points")
    return rows


if __name__ == "__main__":
    main()
