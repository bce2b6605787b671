"""agmm-bench MODEL...: per backend and precision, compute and end-to-end latency against the floor of that
precision on that device, in one table.

MODEL is any artifact a backend of the runtime table reads (``agmm_deploy.runtime.backends()``: a checkpoint
for PyTorch eager, an .onnx file for ONNX Runtime, an .engine for TensorRT, an OpenVINO .xml, ...) or an
agmm-export output folder (every model file in it, and the mIoU delta its parity.json recorded for each). Each
artifact runs on every device its backend supports among those asked for (``--device auto``: the CPU, plus
CUDA where a GPU is). A checkpoint given alone is exported to a temporary ONNX file first, so
``agmm-bench ckpt.pt`` compares eager with ONNX Runtime.

Two times per row, p50 over round-robin calls (one call of each backend in turn, so load from other processes
on a shared machine falls on all of them alike and the ratios stay fair; absolute numbers move with that load):

- compute: ``runner.run(x)`` with ``x`` already on the runner's device and the logits left there (a CUDA
  synchronise ends the call): what the model costs.
- end to end: a host uint8 RGB image in, a host uint8 label map out: the copy up, normalisation and argmax on
  the runner's device, the copy down. What a caller waits for (decoding and letterboxing excluded).

``Precision`` is what really runs (TF32 on or off for PyTorch and ONNX Runtime on CUDA; what OpenVINO compiled
the unquantised layers at). ``floor ms`` is the model's FLOPs (counted densely) divided by the device's rate at
that precision: on the CPU a GEMM rate measured here for ~1 s per precision (fp32 best of torch, numpy and ONNX
Runtime; bf16 torch.matmul; int8 ONNX Runtime's MatMulInteger and torch._int_mm), on a GPU the dense tensor-core
peak of a known GPU model (fp32: a measured matmul with TF32 off). ``% floor`` = floor / compute: how much of
that rate the backend uses; convolutions whose dilated taps fall into padding (ASPP) let backends skip work, so
a fast backend can pass 100 %. ``vs BASE`` divides the baseline's compute time (``--baseline``, PyTorch eager by
default) by the row's, on the same device and batch (>1 = faster).
"""

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
    parser.add_argument("--baseline", default=EAGER_BACKEND,
                        help="the runtime whose fp32 compute time the 'vs' column divides by (e.g. onnxruntime)")
    parser.add_argument("--no-auto-onnx", action="store_true",
                        help="do not export a checkpoint given alone to a temporary ONNX file")
    return parser


# The runtime whose rows the "vs eager" column divides by.
EAGER_BACKEND = "pytorch"


@dataclass
class Row:
    """One timed (artifact, device, batch); ``backend`` is what the runner reports, ``runtime`` its table row.

    ``p50_ms``/``p90_ms`` are the compute time, ``e2e_ms`` the end-to-end p50 (None: not timed); ``precision`` is
    the artifact's, ``precision_used`` what really ran; ``miou_delta`` from the export's parity.json, if any.
    """

    backend: str
    artifact: str
    precision: str
    batch: int
    p50_ms: float
    p90_ms: float
    calls: int
    device: str = "cpu"
    runtime: str = ""
    e2e_ms: float | None = None
    precision_used: str = ""
    miou_delta: float | None = None

    @property
    def images_per_s(self) -> float:
        return 1000.0 * self.batch / (self.e2e_ms or self.p50_ms)


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


def _timed_rate(call, flops: float, seconds: float = 1.0) -> float:
    """GFLOP/s of ``call`` (``flops`` each): the best call over about ``seconds`` of calls, after a warm-up."""
    call()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds or best == float("inf"):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def _onnxruntime_matmul_integer(n: int):
    """A one-node MatMulInteger session (uint8 x int8 -> int32): the kernel ONNX Runtime's int8 models run."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from agmm_deploy.runtime.ort import cpu_session_options

    inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
              helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])]
    output = [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])]
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "gemm8", inputs, output)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), cpu_session_options(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (n, n), dtype=np.uint8)
    b = rng.integers(-127, 127, (n, n), dtype=np.int8)
    return lambda: session.run(None, {"a": a, "b": b})


def measure_cpu_gemm_rates(n: int = 2048, seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """GFLOP/s of n^3 matrix products on this CPU, per precision and library (2 n^3 operations each, ~``seconds``
    per library): bf16 by torch.matmul, int8 by ONNX Runtime's MatMulInteger and torch._int_mm (where this torch
    has it on the CPU). fp32 is measure_gemm_gflops'."""
    import torch

    flops = 2 * n ** 3
    a16 = torch.randn(n, n, dtype=torch.bfloat16)
    rates = {"bf16": {"torch": _timed_rate(lambda: torch.matmul(a16, a16), flops, seconds)},
             "int8": {"onnxruntime": _timed_rate(_onnxruntime_matmul_integer(n), flops, seconds)}}
    a8 = torch.randint(-127, 127, (n, n), dtype=torch.int8)
    try:
        rates["int8"]["torch"] = _timed_rate(lambda: torch._int_mm(a8, a8), flops, seconds)
    except (RuntimeError, AttributeError):
        pass  # no CPU kernel in this torch build
    return rates


# Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity), by a substring of
# torch.cuda.get_device_name(); the first match wins, so longer names come first. TF32 runs at half this rate
# and int8 at twice it on these GPUs.
GPU_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
)
TENSOR_CORE_SCALE = {"tf32": 0.5, "fp16": 1.0, "bf16": 1.0, "int8": 2.0}


def gpu_peak_gflops(device_name: str, precision: str) -> float | None:
    """The tensor-core peak of ``precision`` on a known GPU model, in GFLOP/s; None for an unknown GPU or fp32."""
    scale = TENSOR_CORE_SCALE.get(precision)
    for name, tflops in GPU_BF16_TFLOPS:
        if name in device_name and scale is not None:
            return tflops * scale * 1e3
    return None


def floor_rates(devices: list[str], n: int) -> dict[tuple[str, str], tuple[float, str]]:
    """(device, precision) -> (GFLOP/s, where the figure comes from), for every precision a device has a rate for.

    fp32 from measure_gemm_gflops on both devices; on the CPU bf16/int8 measured; on a GPU the data-sheet peak.
    """
    import torch

    rates: dict[tuple[str, str], tuple[float, str]] = {}
    for device in devices:
        fp32 = measure_gemm_gflops(device, n=n)
        lib = max(fp32, key=fp32.get)
        rates[device, "fp32"] = (fp32[lib], f"{lib} matmul {n}^3")
        if device == "cpu":
            for precision, libs in measure_cpu_gemm_rates(n).items():
                lib = max(libs, key=libs.get)
                rates[device, precision] = (libs[lib], f"{lib} matmul {n}^3")
        else:
            name = torch.cuda.get_device_name()
            for precision in TENSOR_CORE_SCALE:
                if (peak := gpu_peak_gflops(name, precision)) is not None:
                    rates[device, precision] = (peak, f"{name} data-sheet peak")
    return rates


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


def time_interleaved(calls: list, iters: int, warmup: int, max_seconds: float) -> list[tuple[float, float, int]]:
    """(p50 ms, p90 ms, calls) of each ``call()``, timed round-robin.

    One call of each backend in turn, rather than all calls of one backend then the next, so that other load on
    a shared machine (or CPU frequency drift) falls on every backend alike and the ratios stay fair.
    """
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    budget = max_seconds * len(calls)
    while len(times[0]) < iters and (len(times[0]) < 3 or time.perf_counter() - start < budget):
        for call, samples in zip(calls, times):
            t0 = time.perf_counter()
            call()
            samples.append(1000 * (time.perf_counter() - t0))
    return [(float(np.percentile(t, 50)), float(np.percentile(t, 90)), len(t)) for t in times]


def compute_call(runner, images: np.ndarray):
    """``runner.run`` on the images already on its device, the logits left there (synchronised on CUDA)."""
    import torch

    x = torch.from_numpy(images).to(runner.device)

    def call() -> None:
        runner.run(x)
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)

    return call


def end_to_end_call(runner, rgb: np.ndarray):
    """Host uint8 RGB (N, H, W, 3) in, host uint8 label maps (N, H, W) out: copy up, normalise and argmax on the
    runner's device, copy down."""
    import torch

    mean = torch.tensor(runner.meta.mean, device=runner.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(runner.meta.std, device=runner.device).view(1, 3, 1, 1) * 255

    def call() -> np.ndarray:
        x = torch.from_numpy(rgb).to(runner.device).permute(0, 3, 1, 2).float()
        return runner.run((x - mean) / std).argmax(1).to(torch.uint8).cpu().numpy()

    return call


def parity_miou_delta(path: Path) -> float | None:
    """The mIoU delta the export's parity.json (beside the artifact) recorded for it; None when there is none."""
    import json

    report = path.parent / "parity.json"
    if not report.is_file():
        return None
    for backend in json.loads(report.read_text()).get("backends", []):
        if Path(backend.get("artifact", "")).name == path.name:
            return backend.get("miou_delta")
    return None


def floor_precision(row: Row) -> str:
    """The precision whose rate bounds the row: an fp32 model on CUDA with TF32 on runs at TF32's."""
    return "tf32" if row.precision == "fp32" and "tf32=on" in row.precision_used else row.precision


def format_table(rows: list[Row], flops: float | None, rates: dict[tuple[str, str], tuple[float, str]],
                 baseline: str = EAGER_BACKEND) -> str:
    # Each row is compared with the baseline's fp32 compute time on the same device and batch where that was
    # timed (else on the CPU).
    base = {(r.batch, r.device): r.p50_ms for r in rows if r.runtime == baseline and r.precision == "fp32"}
    header = (f"{'Backend':<18} {'Format':<6} {'Precision':<16} {'Batch':>5} {'compute':>9} {'e2e ms':>9} "
              f"{'img/s':>7} {'vs ' + baseline[:8]:>11} {'floor ms':>9} {'% floor':>7} {'mIoU d':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        reference = base.get((r.batch, r.device), base.get((r.batch, "cpu")))
        ratio = f"{reference / r.p50_ms:.2f}x" if reference else "-"
        rate = rates.get((r.device, floor_precision(r)))
        floor = flops * r.batch / (rate[0] * 1e9) * 1000 if flops and rate else None
        lines.append(f"{r.backend:<18} {r.artifact:<6} {(r.precision_used or r.precision):<16} {r.batch:>5} "
                     f"{r.p50_ms:>9.1f} {(f'{r.e2e_ms:.1f}' if r.e2e_ms else '-'):>9} {r.images_per_s:>7.2f} "
                     f"{ratio:>11} {(f'{floor:.1f}' if floor else '-'):>9} "
                     f"{(f'{100 * floor / r.p50_ms:.0f}%' if floor else '-'):>7} "
                     f"{(f'{r.miou_delta:+.2f}' if r.miou_delta is not None else '-'):>7}")
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
    print(f"agmm-bench: {first.meta.num_classes} classes at {h}x{w}; "
          f"{(f'{flops / 1e9:.1f} GFLOP' if flops else 'FLOPs unknown')} per image (FlopCounterMode, dense count); "
          f"{torch.get_num_threads()} CPU threads"
          f"{f', GPU {torch.cuda.get_device_name()}' if 'cuda' in devices else ''}; backends timed round-robin",
          flush=True)

    rows: list[Row] = []
    for batch in args.batch:
        rng = np.random.default_rng(0)
        images = rng.standard_normal((batch, 3, h, w)).astype(np.float32)
        rgb = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
        # One call per batch (not split by max_batch), except for graphs with a fixed batch of 1.
        saved = [r.max_batch for _, r in runners]
        for _, r in runners:
            if getattr(r, "fields", {}).get("dynamic_batch") is not False:
                r.max_batch = max(r.max_batch, batch)
        calls = [compute_call(r, images) for _, r in runners] + [end_to_end_call(r, rgb) for _, r in runners]
        results = time_interleaved(calls, args.iters, args.warmup, args.max_seconds)
        for (path, r), previous, (p50, p90, n), (e2e, _, _) in zip(runners, saved, results, results[len(runners):]):
            r.max_batch = previous
            rows.append(Row(r.backend, path.suffix.lstrip("."), r.precision, batch, p50, p90, n,
                            device=r.device.type, runtime=backend_for(path).name, e2e_ms=e2e,
                            precision_used=r.precision_used(), miou_delta=parity_miou_delta(path)))
            print(f"  {r.backend:<18} {r.precision:<5} batch {batch}: compute p50 {p50:.1f} ms, end to end "
                  f"{e2e:.1f} ms over {n} calls", flush=True)
    # Rates measured after the timings, so that the GEMMs do not heat or load the machine before them.
    rates = floor_rates(devices, args.gemm_size)
    for (device, precision), (rate, source) in rates.items():
        print(f"floor rate {device} {precision}: {rate:.3g} GFLOP/s ({source})")
    print(format_table(rows, flops, rates, args.baseline))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
