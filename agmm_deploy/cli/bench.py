"""agmm-bench MODEL...: latency and throughput of every backend at every batch size, in one table.

MODEL is any artifact a backend of the runtime table reads (``agmm_deploy.runtime.backends()``: a checkpoint
for PyTorch eager, an .onnx file for ONNX Runtime, an .engine for TensorRT, ...) or an agmm-export output
folder (every model file in it). Each artifact runs on every device its backend supports among those asked
for (``--device auto``: the CPU, plus CUDA where a GPU is). A checkpoint given alone is exported to a temporary
ONNX file first, so ``agmm-bench ckpt.pt`` compares eager with ONNX Runtime.

Columns (after Ultralytics' ``benchmark``): p50/p90 latency per call, images per second, the speed-up over
PyTorch eager at the same batch size (>1 = faster), and the achieved GFLOP/s (model FLOPs x images / p50) next
to the machine's measured fp32 GEMM rate (the best of torch, numpy and ONNX Runtime matmuls), i.e. how much of
the hardware the backend uses. FLOPs are counted densely (every tap of every convolution); convolutions whose
dilated taps fall into the zero padding (ASPP rates 12/24/36 on a 64x128 feature map) let backends skip work,
so a fast backend can show more than 100 % of GEMM.
Latency is end to end for the runner call: numpy in, numpy out (host<->device copies included on GPUs).
Backends are timed round-robin (one call each in turn), so load from other processes on a shared machine
falls on all of them alike and the ratios stay fair; the absolute numbers still move with that load."""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("agmm-bench", description="Benchmark PyTorch eager vs ONNX Runtime vs "
                                     "TensorRT on the same model and inputs.")
    parser.add_argument("models", type=Path, nargs="+",
                        help="model files (checkpoints, .onnx, .engine, ...) or agmm-export output folders")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes, e.g. --batch 1 4")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per backend and batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="time budget per backend and batch size (at least 3 calls each are kept)")
    parser.add_argument("--height", type=int, default=None, help="input height (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="input width (default: the model's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CPU backends, plus CUDA ones where a GPU is")
    parser.add_argument("--gemm-size", type=int, default=2048, help="n of the n^3 matmuls measuring the GEMM rate")
    parser.add_argument("--no-auto-onnx", action="store_true",
                        help="do not export a checkpoint given alone to a temporary ONNX file")
    return parser


# The runtime whose rows the "vs eager" column divides by.
EAGER_BACKEND = "pytorch"


@dataclass
class Row:
    """One timed (artifact, device, batch); ``backend`` is what the runner reports, ``runtime`` its table row."""

    backend: str
    artifact: str
    precision: str
    batch: int
    p50_ms: float
    p90_ms: float
    calls: int
    device: str = "cpu"
    runtime: str = ""

    @property
    def images_per_s(self) -> float:
        return 1000.0 * self.batch / self.p50_ms


def _best_seconds(call, repeats: int) -> float:
    call()  # warm-up: thread pools, kernel selection, allocation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _onnxruntime_matmul(n: int):
    """A one-node MatMul session: ONNX Runtime's own GEMM (MLAS), with the same CPU options as the runners."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from agmm_deploy.runtime.ort import cpu_session_options

    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), cpu_session_options(),
                                   providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return lambda: session.run(None, {"a": a, "b": a})


def measure_gemm_gflops(device: str = "cpu", n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """The machine's fp32 matrix-multiply rate per library: best of ``repeats`` n^3 products, 2 n^3 FLOPs each.

    On the CPU the libraries differ a lot (e.g. MKL behind torch.matmul takes slower code paths on AMD CPUs than
    ONNX Runtime's MLAS), so torch, numpy and ONNX Runtime are all measured and the best is the machine's rate.
    """
    import torch

    flops = 2 * n ** 3
    if device == "cuda":
        a = torch.randn(n, n, device="cuda")

        def call() -> None:
            torch.matmul(a, a)
            torch.cuda.synchronize()

        return {"torch": flops / _best_seconds(call, repeats) / 1e9}
    a_torch = torch.randn(n, n)
    a_numpy = a_torch.numpy()
    calls = {"torch": lambda: torch.matmul(a_torch, a_torch), "numpy": lambda: a_numpy @ a_numpy,
             "onnxruntime": _onnxruntime_matmul(n)}
    return {name: flops / _best_seconds(call, repeats) / 1e9 for name, call in calls.items()}


def count_flops(config_dict: dict, height: int, width: int) -> float:
    """FLOPs of one forward pass at (height, width), counted on the meta device (no memory, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from agmm_deploy.model import DeepLabV3Plus, ModelConfig

    with torch.device("meta"):
        model = DeepLabV3Plus(ModelConfig.from_dict(config_dict)).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, 3, height, width))
    return float(counter.get_total_flops())


def _model_config(runner) -> dict | None:
    """The architecture, to count FLOPs: from the checkpoint, or recorded in ONNX/engine metadata by the export."""
    if hasattr(runner, "model"):
        return runner.model.config.to_dict()
    return getattr(runner, "fields", {}).get("model_config")


def _expand(models: list[Path]) -> list[Path]:
    """Files as given; folders (agmm-export outputs) as the model files in them, by the runtime table."""
    from agmm_deploy.runtime import describe_suffixes, model_suffixes

    paths = []
    for item in models:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in model_suffixes())
            if not found:
                raise FileNotFoundError(f"{item} holds no model file; expected {describe_suffixes()} in it, or "
                                        "pass files instead")
            paths += found
        else:
            paths.append(item)
    return paths


def plan_runs(paths: list[Path], devices: list[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(path, device) pairs in table order (eager first), each artifact on every asked device its backend runs
    on; and one line per artifact that none of them can run.

    Raises:
        ValueError: a file whose suffix no backend reads.
    """
    from agmm_deploy.runtime import backend_for, backends

    order = {backend.name: i for i, backend in enumerate(backends())}
    plans, skipped = [], []
    for path in paths:
        backend = backend_for(path)
        usable = [d for d in devices if d in backend.devices]
        if not usable:
            skipped.append(f"skipping {path}: {backend.missing(devices[-1])}")
        plans += [(order[backend.name], device != "cpu", path, device) for device in usable]
    plans.sort(key=lambda p: (p[0], p[1]))
    return [(path, device) for _, _, path, device in plans], skipped


def time_interleaved(runners: list, images: np.ndarray, iters: int, warmup: int,
                     max_seconds: float) -> list[tuple[float, float, int]]:
    """(p50 ms, p90 ms, calls) of each ``runner(images)``, timed round-robin.

    One call of each backend in turn, rather than all calls of one backend then the next, so that other load on
    a shared machine (or CPU frequency drift) falls on every backend alike and the ratios stay fair.
    """
    for runner in runners:
        for _ in range(warmup):
            runner(images)
    times: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    budget = max_seconds * len(runners)
    while len(times[0]) < iters and (len(times[0]) < 3 or time.perf_counter() - start < budget):
        for runner, samples in zip(runners, times):
            t0 = time.perf_counter()
            runner(images)
            samples.append(1000 * (time.perf_counter() - t0))
    return [(float(np.percentile(t, 50)), float(np.percentile(t, 90)), len(t)) for t in times]


def format_table(rows: list[Row], flops: float | None, gemm: dict[str, float]) -> str:
    # Each backend is compared with PyTorch eager on the same kind of device where that was timed.
    eager = {(r.batch, r.device): r.p50_ms for r in rows if r.runtime == EAGER_BACKEND}
    header = (f"{'Backend':<18} {'Format':<8} {'Precision':<9} {'Batch':>5} {'p50 ms':>9} {'p90 ms':>9} "
              f"{'img/s':>7} {'vs eager':>8} {'GFLOP/s':>8} {'% GEMM':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        reference = eager.get((r.batch, r.device), eager.get((r.batch, "cpu")))
        ratio = f"{reference / r.p50_ms:.2f}x" if reference else "-"
        gflops = flops * r.batch / (r.p50_ms / 1000) / 1e9 if flops else None
        # The measured GEMM rate is fp32's: a share of it says nothing for int8/fp16 kernels.
        peak = gemm.get(r.device) if r.precision == "fp32" else None
        share = f"{100 * gflops / peak:.0f}%" if gflops and peak else "-"
        lines.append(f"{r.backend:<18} {r.artifact:<8} {r.precision:<9} {r.batch:>5} {r.p50_ms:>9.1f} "
                     f"{r.p90_ms:>9.1f} {r.images_per_s:>7.2f} {ratio:>8} "
                     f"{(f'{gflops:.1f}' if gflops else '-'):>8} {share:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    import torch

    from agmm_deploy.checkpoint import CheckpointError
    from agmm_deploy.runtime import backend_for, load_runner

    has_cuda = torch.cuda.is_available() and args.device != "cpu"
    devices = ["cuda"] if args.device == "cuda" else (["cpu", "cuda"] if has_cuda else ["cpu"])
    try:
        paths = _expand(args.models)
        runtimes = [backend_for(p).name for p in paths]
    except (FileNotFoundError, ValueError) as err:
        print(f"agmm-bench: error: {err}", file=sys.stderr)
        return 2
    tmp = tempfile.TemporaryDirectory(prefix="agmm-bench-")
    checkpoints = [p for p, runtime in zip(paths, runtimes) if runtime == EAGER_BACKEND]
    if checkpoints and len(paths) == len(checkpoints) and not args.no_auto_onnx:
        from agmm_deploy.checkpoint import load_model
        from agmm_deploy.export.onnx import export_onnx

        loaded = load_model(checkpoints[0])
        h, w = args.height or loaded.meta.input_size[0], args.width or loaded.meta.input_size[1]
        print(f"agmm-bench: exporting {checkpoints[0].name} to a temporary ONNX file at {h}x{w}", flush=True)
        onnx_path = Path(tmp.name) / "model.onnx"
        export_onnx(loaded.model, loaded.meta, onnx_path, height=h, width=w, max_batch=max(args.batch))
        del loaded
        gc.collect()
        paths.append(onnx_path)

    plans, skipped = plan_runs(paths, devices)
    for line in skipped:
        print(f"agmm-bench: {line}", file=sys.stderr)
    runners = []
    for path, device in plans:
        try:
            runners.append((path, load_runner(path, device)))
        except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as err:
            print(f"agmm-bench: error: {err}", file=sys.stderr)
            return 2
    if not runners:
        print(f"agmm-bench: error: nothing to run on {'/'.join(devices)}", file=sys.stderr)
        return 2
    first = runners[0][1]
    h = args.height or first.input_size[0]
    w = args.width or first.input_size[1]
    config = next((c for c in (_model_config(r) for _, r in runners) if c), None)
    flops = count_flops(config, h, w) if config else None
    gemm = {d: measure_gemm_gflops(d, n=args.gemm_size) for d in devices}
    print(f"agmm-bench: {first.meta.num_classes} classes at {h}x{w}; "
          f"{(f'{flops / 1e9:.1f} GFLOP' if flops else 'FLOPs unknown')} per image (FlopCounterMode, dense count); "
          f"{torch.get_num_threads()} CPU threads"
          f"{f', GPU {torch.cuda.get_device_name()}' if 'cuda' in devices else ''}; backends timed round-robin",
          flush=True)

    rows: list[Row] = []
    for batch in args.batch:
        images = np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32)
        # One call per batch (not split by max_batch), except for graphs with a fixed batch of 1.
        saved = [r.max_batch for _, r in runners]
        for _, r in runners:
            if getattr(r, "fields", {}).get("dynamic_batch") is not False:
                r.max_batch = max(r.max_batch, batch)
        results = time_interleaved([r for _, r in runners], images, args.iters, args.warmup, args.max_seconds)
        for (path, r), previous, (p50, p90, calls) in zip(runners, saved, results):
            r.max_batch = previous
            rows.append(Row(r.backend, path.suffix.lstrip("."), r.precision, batch, p50, p90, calls,
                            device=r.device.type, runtime=backend_for(path).name))
            print(f"  {r.backend:<18} batch {batch}: p50 {p50:.1f} ms over {calls} calls", flush=True)
    # The GEMM rates again at the end; the better of the two is the machine's (the other may have met other load).
    again = {d: measure_gemm_gflops(d, n=args.gemm_size) for d in devices}
    gemm = {d: {lib: max(rate, again[d][lib]) for lib, rate in rates.items()} for d, rates in gemm.items()}
    for d, rates in gemm.items():
        print(f"measured fp32 GEMM {d} ({args.gemm_size}^3, best of start and end): "
              + ", ".join(f"{lib} {rate:.0f}" for lib, rate in rates.items()) + " GFLOP/s")
    gemm = {d: max(rates.values()) for d, rates in gemm.items()}
    print(format_table(rows, flops, gemm))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
