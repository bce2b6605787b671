"""Issue 9's GPU measurements in one run: the served path against the raw runner on one GPU, in under ~8 minutes.

Two load tests of the real `bentoml serve` (benchmarks/serve_load.py), ResNet-18 DeepLabV3+ with random weights:

    model-size  16 clients sending 1024x1024 photos to a 1024x1024 model
    mixed       16 clients sending thumbnails, photos, 2048x1024 street frames and 1600x1200 photos to a
                512x1024 model (1 to 18 model inputs per image)

both with 16 model inputs per batch, then one table of what issue 9 asks of a GPU: served/raw images/s >= 80%
(model size) and >= 70% (mixed), p99 latency <= 3x the raw runner's time for a full batch, zero errors, worker
RSS within 10% after the run. Exits 1 when a target is missed.

    python benchmarks/gpu_serve_check.py                          # on the GPU machine (onnxruntime-gpu, bentoml)
    python benchmarks/gpu_serve_check.py --device cpu --quick     # its dry path on a CPU: tiny sizes, seconds
    python benchmarks/gpu_serve_check.py --out results/           # also keeps the server logs and latency plots
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the sibling serve_load

from benchmarks import serve_load  # noqa: E402

# What each run sends, at full scale (GPU) and quick (the CPU dry path): (traffic, --size, extra arguments).
RUNS = {
    "full": [
        ("model-size", "1024", ["--duration", "60", "--warmup", "20", "--rounds", "3", "--raw-seconds", "3"]),
        ("mixed", "512x1024", ["--duration", "90", "--warmup", "20", "--rounds", "3", "--raw-seconds", "3"]),
    ],
    "quick": [
        ("model-size", "64", ["--duration", "4", "--warmup", "1", "--rounds", "1", "--raw-seconds", "0.5"]),
        ("mixed", "64x128", ["--duration", "4", "--warmup", "1", "--rounds", "1", "--raw-seconds", "0.2",
                             "--mix", "small=80x60,photo=160x120,street=256x128"]),
    ],
}
MAX_P99_BATCHES = 3.0  # issue 9: p99 latency within 3 full batches
MAX_RSS_CHANGE = 0.10


@dataclass(frozen=True)
class Check:
    """One row of the summary: a load test's figures against issue 9's targets."""

    traffic: str
    ratio: float
    target_ratio: float
    p99_batches: float
    errors: int
    requests: int
    rss_change: float

    @property
    def failures(self) -> list[str]:
        missed = []
        if not self.ratio >= self.target_ratio:
            missed.append(f"served/raw {self.ratio:.1%} < {self.target_ratio:.0%}")
        if not self.p99_batches <= MAX_P99_BATCHES:
            missed.append(f"p99 {self.p99_batches:.1f} full batches > {MAX_P99_BATCHES:g}")
        if self.errors or not self.requests:
            missed.append(f"{self.errors} errors in {self.requests} requests")
        if not abs(self.rss_change) <= MAX_RSS_CHANGE:
            missed.append(f"worker RSS {self.rss_change:+.1%}")
        return missed


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (the dry path)")
    parser.add_argument("--quick", action="store_true", help="tiny models and a few seconds per run: checks that "
                        "the script works, measures nothing")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16, help="model inputs per batch in the server")
    parser.add_argument("--out", type=Path, help="folder for each run's server log and latency plot")
    return parser


def print_versions(device: str) -> None:
    import onnxruntime
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}; {gpu}; --device {device}",
          flush=True)


def run_check(traffic: str, size: str, extra: list[str], args: argparse.Namespace) -> Check:
    """One serve_load run (it prints its own report); its figures as a Check."""
    argv = ["--traffic", traffic, "--size", size, "--device", args.device, "--clients", str(args.clients),
            "--max-batch-size", str(args.max_batch_size), *extra]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"{traffic}_{size}"
        argv += ["--server-log", str(args.out / f"{stem}_server.log"), "--plot", str(args.out / f"{stem}.png")]
    print(f"\n$ python benchmarks/serve_load.py {' '.join(argv)}", flush=True)
    result = serve_load.main(argv)
    return Check(traffic=f"{traffic} {size}", ratio=result.ratio, target_ratio=serve_load.target_ratio(result),
                 p99_batches=serve_load.p99_batches(result), errors=sum(s.status != 200 for s in result.samples),
                 requests=len(result.samples), rss_change=result.rss_change)


def print_summary(checks: list[Check]) -> None:
    print(f"\n{'traffic':<22}{'served/raw':>11}{'target':>8}{'p99/batch':>11}{'errors':>14}{'RSS':>8}   verdict")
    for c in checks:
        p99 = f"{c.p99_batches:.1f}" if math.isfinite(c.p99_batches) else "n/a"
        verdict = "met" if not c.failures else "MISSED: " + "; ".join(c.failures)
        print(f"{c.traffic:<22}{c.ratio:>11.1%}{c.target_ratio:>8.0%}{p99:>11}{f'{c.errors}/{c.requests}':>14}"
              f"{c.rss_change:>+8.1%}   {verdict}")


def main(argv: list[str] | None = None) -> list[Check]:
    args = get_args_parser().parse_args(argv)
    print_versions(args.device)
    checks = [run_check(traffic, size, extra, args) for traffic, size, extra in RUNS["quick" if args.quick else "full"]]
    print_summary(checks)
    return checks


if __name__ == "__main__":
    sys.exit(1 if any(check.failures for check in main()) else 0)
