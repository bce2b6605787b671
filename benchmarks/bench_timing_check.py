"""agmm-bench's timings against a direct measurement of the same loaded model, in one run.

    python benchmarks/bench_timing_check.py                                   # fresh R50, 512x1024, ONNX Runtime
    python benchmarks/bench_timing_check.py --backbone resnet18 --height 128 --width 256 --device cpu
    python benchmarks/bench_timing_check.py model.engine --device cuda        # any artifact of the runtime table

One runner is loaded once (the given artifact, or a fresh random-weight DeepLabV3+ saved as a checkpoint for
``--runtime pytorch`` or exported to ONNX for ``--runtime onnxruntime``) and timed two ways:

- agmm-bench: its own functions (agmm_deploy.cli.bench: compute_call, end_to_end_call, time_interleaved).
- direct: the way one times a model by hand: the input already on the device, the model's own session or module
  called without the runner around it (PyTorch: the module under inference_mode; ONNX Runtime: session.run on
  the CPU, run_with_iobinding with buffers bound once on CUDA; TensorRT: execute_async_v3 with addresses set
  once; OpenVINO: the infer request), each call between two synchronisations (perf_counter; on CUDA also CUDA
  events around the same calls), after 3 untimed calls; the median.

First a fresh agmm-bench run exactly as the CLI does it (``--warmup 1``, ``--iters 10``, its defaults), then
``--samples`` times in turn: one agmm-bench sample (compute and end to end), one direct call, and one direct call
of each step of end to end (upload and normalisation, the runner on that tensor, argmax and download), the order
rotated every time so that load from other processes falls on all alike. Both ratios (agmm-bench compute p50 /
direct p50, fresh and interleaved) must be within ``--tolerance`` (20 %) for PASS (exit 0, else 1). The load
average is printed before and after: on a shared machine read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("bench_timing_check", description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, nargs="?", default=None,
                        help="an artifact any runtime of the table reads (default: a fresh model, see --runtime)")
    parser.add_argument("--runtime", default="onnxruntime", choices=("pytorch", "onnxruntime"),
                        help="without MODEL: time the fresh model as a checkpoint (pytorch) or exported to ONNX")
    parser.add_argument("--backbone", default="resnet50", help="without MODEL: the fresh model's backbone")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10, help="the fresh agmm-bench run's timed calls (its default)")
    parser.add_argument("--warmup", type=int, default=1, help="agmm-bench's untimed calls (its default)")
    parser.add_argument("--samples", type=int, default=30, help="interleaved agmm-bench samples and direct calls")
    parser.add_argument("--tolerance", type=float, default=0.2, help="largest |ratio - 1| that passes")
    return parser


def fresh_artifact(folder: Path, runtime: str, backbone: str, height: int, width: int, batch: int) -> Path:
    """A random-weight DeepLabV3+ (19 classes) as a checkpoint, exported to ONNX for ``runtime`` onnxruntime."""
    import torch

    from agmm_deploy.checkpoint import save_checkpoint
    from agmm_deploy.contract import ModelMeta
    from agmm_deploy.export.onnx import export_onnx
    from agmm_deploy.model import DeepLabV3Plus, ModelConfig

    torch.manual_seed(0)
    model = DeepLabV3Plus(ModelConfig(backbone=backbone, num_classes=19)).eval()
    meta = ModelMeta.for_dataset("cityscapes", (height, width))
    if runtime == "pytorch":
        return save_checkpoint(folder / "model.pt", model, meta)
    path = folder / "model.onnx"
    export_onnx(model, meta, path, height=height, width=width, max_batch=max(batch, 1))
    return path


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def direct_call(runner, x) -> tuple[str, Callable[[], None]]:
    """(what is called, one call of the runner's own model on ``x``, already on its device), without the runner."""
    import torch

    runtime = runner.backend.split("-")[0]
    if runtime == "pytorch":
        def call() -> None:
            with torch.inference_mode():
                runner.model(x)

        return "module(x) under inference_mode", call
    if runtime == "onnxruntime" and runner.device.type == "cpu":
        feed = {runner.input_name: x.numpy()}
        return "session.run", lambda: runner.session.run(["logits"], feed)
    if runtime == "onnxruntime":
        x = x.to(runner.input_types[0]).contiguous()  # the graph's input type, as the runner binds it
        n, _, h, w = x.shape
        out = torch.empty((n, runner.meta.num_classes, h, w), dtype=runner.output_types[0], device=x.device)
        binding = runner.session.io_binding()
        binding.bind_input(name=runner.input_name, device_type="cuda", device_id=x.device.index,
                           element_type=runner.input_types[1], shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        binding.bind_output(name="logits", device_type="cuda", device_id=x.device.index,
                            element_type=runner.output_types[1], shape=tuple(out.shape), buffer_ptr=out.data_ptr())

        def call(buffers=(x, out)) -> None:  # the binding holds only pointers: the call keeps the tensors alive
            runner.session.run_with_iobinding(binding)

        return "session.run_with_iobinding, bound once", call
    if runtime == "tensorrt":
        context, stream = runner.context, torch.cuda.current_stream(x.device)
        context.set_input_shape(runner.input_name, tuple(x.shape))
        context.set_tensor_address(runner.input_name, x.data_ptr())
        outputs = [torch.empty(tuple(context.get_tensor_shape(name)), device=x.device,
                               dtype=runner._torch_dtype[runner.engine.get_tensor_dtype(name)])
                   for name in runner.output_names]
        for name, out in zip(runner.output_names, outputs):
            context.set_tensor_address(name, out.data_ptr())

        def call(buffers=(x, *outputs)) -> None:  # the context holds only pointers: the call keeps them alive
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to execute {runner.path.name}")

        return "execute_async_v3, addresses set once", call
    if runtime == "openvino":
        feed = {0: x.numpy()}
        return "infer request", lambda: runner.request.infer(feed)
    return "runner.run (no direct call known for this runtime)", lambda: runner.run(x)


def time_direct(call: Callable[[], object], device, iters: int, warmup: int) -> tuple[list[float], list[float]]:
    """(perf_counter ms, CUDA event ms or []) of ``iters`` calls, each between two synchronisations."""
    import torch

    for _ in range(warmup):
        call()
    synchronize(device)
    wall, events = [], []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            end.record()
        synchronize(device)
        wall.append(1000 * (time.perf_counter() - t0))
        if device.type == "cuda":
            events.append(start.elapsed_time(end))
    return wall, events


def end_to_end_parts(runner, rgb: np.ndarray) -> dict[str, Callable[[], object]]:
    """end_to_end_call in its three steps, as separate calls: host uint8 RGB -> normalised float on the device;
    the runner on that tensor (laid out as the permute left it, as serving feeds it, not as ``compute`` gets it);
    logits on the device -> host uint8 labels."""
    import torch

    mean = torch.tensor(runner.meta.mean, device=runner.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(runner.meta.std, device=runner.device).view(1, 3, 1, 1) * 255

    def upload() -> torch.Tensor:
        return (torch.from_numpy(rgb).to(runner.device).permute(0, 3, 1, 2).float() - mean) / std

    x = upload()
    layout = "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    logits = runner.run(x)
    return {"upload + normalise": upload, f"run on it ({layout})": lambda: runner.run(x),
            "argmax + download": lambda: logits.argmax(1).to(torch.uint8).cpu().numpy()}


def verdict(ratio: float, tolerance: float) -> str:
    return "PASS" if abs(ratio - 1) <= tolerance else "FAIL"


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    import torch

    from agmm_deploy.cli.bench import compute_call, end_to_end_call, time_interleaved
    from agmm_deploy.runtime import load_runner

    tmp = tempfile.TemporaryDirectory(prefix="bench-check-")
    path = args.model or fresh_artifact(Path(tmp.name), args.runtime, args.backbone, args.height, args.width,
                                        args.batch)
    runner = load_runner(path, args.device)
    h, w = runner.input_size
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 3, h, w)).astype(np.float32)
    rgb = rng.integers(0, 256, (args.batch, h, w, 3), dtype=np.uint8)
    x = torch.from_numpy(images).to(runner.device)
    what, direct = direct_call(runner, x)
    print(f"bench_timing_check: {path.name} on {runner.backend} ({runner.precision_used()}), {h}x{w}, batch "
          f"{args.batch}, {torch.get_num_threads()} CPU threads"
          f"{f', GPU {torch.cuda.get_device_name(runner.device)}' if runner.device.type == 'cuda' else ''}; "
          f"direct: {what}; load average {os.getloadavg()[0]:.2f}", flush=True)

    bench_calls = [compute_call(runner, images), end_to_end_call(runner, rgb)]
    # 1. A fresh agmm-bench run: its warm-up and --iters on a runner nothing has called yet.
    (fresh, _, _), (fresh_e2e, _, _) = time_interleaved(bench_calls, args.iters, args.warmup, max_seconds=60.0)
    # 2. Steady state: one agmm-bench sample (time_interleaved of one call each), one direct call and one call of
    # each end-to-end step in turn, the order rotated every step, so that load from other processes falls on all
    # of them alike.
    parts = end_to_end_parts(runner, rgb)
    calls = {"direct": direct, **parts}
    for call in calls.values():
        time_direct(call, runner.device, iters=0, warmup=3)
    bench, e2e, events = [], [], []
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(args.samples):
        order = ["bench", *calls]
        for step in order[i % len(order):] + order[:i % len(order)]:
            if step == "bench":
                (compute, _, _), (e2e_ms, _, _) = time_interleaved(bench_calls, 1, 0, max_seconds=60.0)
                bench.append(compute)
                e2e.append(e2e_ms)
            else:
                wall, event = time_direct(calls[step], runner.device, iters=1, warmup=0)
                samples[step] += wall
                events += event if step == "direct" else []
    wall = samples.pop("direct")
    direct_p50, bench_p50 = statistics.median(wall), statistics.median(bench)
    first, steady = fresh / direct_p50, bench_p50 / direct_p50
    print(f"compute, a fresh agmm-bench run (warm-up {args.warmup}, {args.iters} calls): p50 {fresh:.2f} ms, "
          f"end to end {fresh_e2e:.2f} ms; ratio to direct {first:.3f} {verdict(first, args.tolerance)}")
    print(f"compute, {len(bench)} agmm-bench samples interleaved with {len(wall)} direct calls: agmm-bench p50 "
          f"{bench_p50:.2f} ms, direct p50 {direct_p50:.2f} ms (perf_counter between synchronisations), ratio "
          f"{steady:.3f} {verdict(steady, args.tolerance)} (tolerance {100 * args.tolerance:.0f} %)")
    if events:
        event_p50 = statistics.median(events)
        print(f"  direct by CUDA events: p50 {event_p50:.2f} ms (agmm-bench / events {bench_p50 / event_p50:.3f})")
    e2e_p50 = statistics.median(e2e)
    parts = {name: statistics.median(times) for name, times in samples.items()}
    print(f"end to end: p50 {e2e_p50:.2f} ms = compute + {e2e_p50 - bench_p50:.2f} ms; its steps measured "
          f"directly: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in parts.items())
          + f" (sum {sum(parts.values()):.2f} ms)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    tmp.cleanup()
    return 0 if verdict(first, args.tolerance) == verdict(steady, args.tolerance) == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
