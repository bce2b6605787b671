"""Load test of the BentoML service against the raw backend, in one run on this machine.

Starts the real `bentoml serve` (project root, bentofile.yaml) on 127.0.0.1, drives /segment from N
concurrent clients for a bounded time after a warm-up, and prints throughput, p50/p99 latency, errors, the
adaptive batch-size histogram from /metrics, the server's memory after warm-up and after the run, and the
ratio of served images/s to the raw runner's images/s on the same model at the same input size. Raw and
served phases alternate, so that both see the same background load on a shared machine.

    python benchmarks/serve_load.py                          # ResNet-18 DeepLabV3+ exported at 512x512
    python benchmarks/serve_load.py --model model.onnx --clients 16 --duration 120

Targets (issue 5, CPU, ResNet-18 at 512x512, 8 clients): served >= 80% of raw ONNX Runtime images/s, no
errors, RSS after the run within 10% of RSS after warm-up.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image
from tqdm import tqdm

from serving.launch import free_port, start_server, stop_server



def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, help="model to serve (.onnx/.engine/.pt); default: export "
                        "a randomly initialised ResNet-18 DeepLabV3+ at --size to a temporary folder")
    parser.add_argument("--size", type=int, default=512, help="input side of the exported model and of the "
                        "test image")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--duration", type=float, default=100.0, help="seconds of measured load, in all")
    parser.add_argument("--rounds", type=int, default=5, help="served phases, each between two raw phases")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of unmeasured load first")
    parser.add_argument("--raw-seconds", type=float, default=5.0, help="seconds per batch size per raw phase")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-latency-ms", type=int, default=20_000)
    parser.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime intra-op threads in the "
                        "server (0: the runner's default, one per core)")
    parser.add_argument("--server-log", type=Path, help="keep the server's output in this file")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda, for the server and the raw runner")
    return parser


def export_default_model(size: int, folder: Path) -> Path:
    import torch

    from agmm_deploy.export.onnx import export_onnx
    from agmm_deploy.contract import ModelMeta
    from agmm_deploy.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.pascal(backbone="resnet18", stem="torchvision", output_stride=16))
    path = folder / f"resnet18_{size}.onnx"
    print(f"exporting ResNet-18 DeepLabV3+ (random weights) at {size}x{size} to {path} ...", flush=True)
    export_onnx(model, ModelMeta.for_dataset("pascal", (size, size)), path, height=size, width=size)
    return path


def test_image(size: int) -> bytes:
    """A smooth synthetic photo-like JPEG (gradients and shapes), size x size."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(4 * y) * 0.5 + 0.5, x * y], axis=-1) * 255
    rng = np.random.default_rng(0)
    for _ in range(12):
        x0, y0 = rng.integers(0, size - size // 4, 2)
        rgb[y0:y0 + size // 5, x0:x0 + size // 4] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def load_raw_runner(model: Path, device: str, threads: int):
    from agmm_deploy.runtime import load_runner

    return load_runner(model, device=device, **({"threads": threads} if threads and model.suffix == ".onnx" else {}))


def raw_rate(runner, batch_sizes: list[int], seconds: float) -> float:
    """Best images/s of the runner alone on normalised random inputs over the batch sizes."""
    h, w = runner.input_size
    rates = []
    for batch in batch_sizes:
        images = np.random.default_rng(0).standard_normal((batch, 3, h, w), dtype=np.float32)
        runner(images)  # warm-up: arena allocation, kernel selection
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            runner(images)
            done += batch
        rates.append(done / (time.perf_counter() - start))
    return max(rates)


def server_rss(pid: int) -> tuple[int, int]:
    """(RSS of the whole server process tree, RSS of its largest process: the worker holding the model)."""
    processes = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    sizes = []
    for process in processes:
        try:
            sizes.append(process.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return sum(sizes), max(sizes)


def batch_histogram(metrics: str) -> dict[str, int]:
    """Batches per size bucket of segment_batch, from BentoML's cumulative Prometheus histogram."""
    cumulative = [(le, float(count)) for le, count in re.findall(
        r'adaptive_batch_size_bucket\{le="([^"]+)",method_name="segment_batch"[^}]*\} (\S+)', metrics)]
    histogram, previous, lower = {}, 0.0, 0.0
    for le, count in cumulative:
        label = f"({lower:g}, {le}]" if le != "+Inf" else f"> {lower:g}"
        if count - previous:
            histogram[label] = int(count - previous)
        previous = count
        lower = float(le) if le != "+Inf" else lower
    return histogram


def drive(url: str, image: bytes, clients: int, seconds: float, desc: str,
          server_pid: int) -> tuple[list[tuple[float, int, int]], float, list[int]]:
    """Sends /segment requests from `clients` threads for `seconds`.

    Returns:
        (latency s, status, batch size) per request; the seconds from the first request to the last answer;
        the worker's RSS sampled every 10 s.
    """
    results: list[tuple[float, int, int]] = []
    lock = threading.Lock()
    started = time.perf_counter()
    stop_at = started + seconds
    rss_trace, next_sample = [], started
    bar = tqdm(total=round(seconds), desc=desc, unit="s", leave=False)

    def client() -> None:
        session = requests.Session()
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                response = session.post(f"{url}/segment", files={"image": ("test.jpg", image, "image/jpeg")},
                                        timeout=120)
                status, batch = response.status_code, int(response.headers.get("x-agmm-batch-size", 0))
            except requests.RequestException:
                status, batch = -1, 0
            with lock:
                results.append((time.perf_counter() - start, status, batch))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        time.sleep(0.2)
        if time.perf_counter() >= next_sample:
            rss_trace.append(server_rss(server_pid)[1])
            next_sample += 10
        bar.n = min(round(seconds), round(seconds - max(0.0, stop_at - time.perf_counter())))
        bar.refresh()
    bar.close()
    # Requests sent before stop_at are answered after it: count the time until the last answer.
    return results, time.perf_counter() - started, rss_trace


def server_env(model: Path, *, device: str, max_batch_size: int, max_latency_ms: int,
               ort_threads: int | None = None) -> dict[str, str]:
    """The environment of the served process: this one's, with the service's AGMM_* settings replaced."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGMM_")}
    env.update(AGMM_MODEL=str(model), AGMM_DEVICE=device, AGMM_MAX_BATCH_SIZE=str(max_batch_size),
               AGMM_MAX_LATENCY_MS=str(max_latency_ms))
    if ort_threads:
        env["AGMM_ORT_THREADS"] = str(ort_threads)
    return env


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        tmp = Path(tmp)
        model = args.model or export_default_model(args.size, tmp)
        image = test_image(args.size)
        batch_sizes = sorted({1, args.max_batch_size})
        runner = load_raw_runner(model, args.device, args.ort_threads)
        env = server_env(model, device=args.device, max_batch_size=args.max_batch_size,
                         max_latency_ms=args.max_latency_ms, ort_threads=args.ort_threads)
        process = start_server(port := free_port(), args.server_log or tmp / "serve.log", env)
        url = f"http://127.0.0.1:{port}"
        # Other work on the machine changes what the cores deliver from minute to minute, so raw and served
        # phases alternate (the idle server takes no CPU during the raw ones) and each served phase is
        # compared with the raw phases on both sides of it.
        raw, served, results, rss_trace, elapsed_total = [], [], [], [], 0.0
        try:
            info = requests.post(f"{url}/info", timeout=30).json()
            drive(url, image, args.clients, args.warmup, "warm-up", process.pid)
            rss_warm = server_rss(process.pid)
            metrics_before = batch_histogram(requests.get(f"{url}/metrics", timeout=30).text)
            for round_ in range(args.rounds):
                raw.append(raw_rate(runner, batch_sizes, args.raw_seconds))
                phase, elapsed, trace = drive(url, image, args.clients, args.duration / args.rounds,
                                              f"served {round_ + 1}/{args.rounds}", process.pid)
                served.append(sum(status == 200 for _, status, _ in phase) / elapsed)
                results += phase
                rss_trace += trace
                elapsed_total += elapsed
            rss_after = server_rss(process.pid)
            metrics_after = batch_histogram(requests.get(f"{url}/metrics", timeout=30).text)
            raw.append(raw_rate(runner, batch_sizes, args.raw_seconds))
        finally:
            stop_server(process)

    latencies = np.array([latency for latency, status, _ in results if status == 200])
    errors = sum(status != 200 for _, status, _ in results)
    ratios = [rate / ((raw[i] + raw[i + 1]) / 2) for i, rate in enumerate(served)]
    served_total = len(latencies) / elapsed_total
    ratio_total = served_total / float(np.mean(raw))
    histogram = {k: n - metrics_before.get(k, 0) for k, n in metrics_after.items() if n - metrics_before.get(k, 0)}
    sizes = [batch for _, status, batch in results if status == 200]
    rss_change = rss_after[1] / rss_warm[1] - 1

    h, w = info["input_size"]
    print(f"\nmodel {info['model']}: backend {info['backend']}, {info['precision']}, input {h}x{w}, "
          f"{len(info['classes'])} classes; max_batch_size {info['max_batch_size']}, "
          f"max_latency_ms {info['max_latency_ms']}; {psutil.cpu_count(logical=True)} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"load: {args.clients} clients on /segment, {args.size}x{args.size} JPEG ({len(image) / 1024:.0f} KiB), "
          f"{elapsed_total:.0f} s in {args.rounds} phases after {args.warmup:.0f} s warm-up; raw = best of "
          f"batch {batch_sizes} on the same model in this process")
    print(f"{'phase':<8}{'raw before':>12}{'served':>10}{'raw after':>12}{'ratio':>9}   (images/s)")
    for i, rate in enumerate(served):
        print(f"{i + 1:<8}{raw[i]:>12.2f}{rate:>10.2f}{raw[i + 1]:>12.2f}{ratios[i]:>9.1%}")
    print(f"{'all':<8}{np.mean(raw):>12.2f}{served_total:>10.2f}{'':>12}{ratio_total:>9.1%}   target >= 80%; "
          f"median of the phases {np.median(ratios):.1%}")
    if len(latencies):
        print(f"latency p50 {np.percentile(latencies, 50) * 1000:.0f} ms, p99 "
              f"{np.percentile(latencies, 99) * 1000:.0f} ms; {len(results)} requests, {errors} errors (target 0)")
    print(f"batch sizes from /metrics (batches per bucket): {histogram}; mean batch size seen by requests "
          f"{np.mean(sizes) if sizes else 0:.2f}")
    print("worker RSS every 10 s under load (MiB): " + " ".join(f"{rss / 2**20:.0f}" for rss in rss_trace))
    print(f"server RSS: worker {rss_warm[1] / 2**20:.0f} MiB after warm-up -> {rss_after[1] / 2**20:.0f} MiB after "
          f"the run ({rss_change:+.1%}, target within 10%); whole tree {rss_warm[0] / 2**20:.0f} -> "
          f"{rss_after[0] / 2**20:.0f} MiB")
    met = ratio_total >= 0.8 and errors == 0 and abs(rss_change) <= 0.10
    print("targets met" if met else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
