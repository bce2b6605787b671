"""Issue 10's GPU figures in one run: the reduced-precision artifacts against torch.compile fp16 channels_last.

    python benchmarks/gpu_precision_check.py --work $OUT/precision              # GPU machine, R50 1024x2048
    python benchmarks/gpu_precision_check.py --work /tmp/precision --quick      # dry path on a CPU, ~3 minutes

1. A checkpoint that separates the synthetic classes (a brief training on a synthetic folder data set at the
   benchmark size, as benchmarks/precision_cpu.py does), so that the parity gates mean something.
2. ``agmm-export`` once per row of ``--rows`` (default: fp16 AOTInductor and fp16 ONNX Runtime for CUDA), each
   checked against PyTorch fp32 on the labelled validation images; what misses its gates is renamed
   ``*.failed`` by the export and not timed as a candidate.
3. One round-robin timing (agmm-bench's ``time_interleaved``) at each batch size of: ONNX Runtime fp32 on the
   fp32 ``model.onnx`` (inputs and outputs on the device; and end to end, host image in and label map out, the
   way the service used it before), every artifact that passed, and the direct reference measured by hand in the
   same process: ``torch.compile`` of the model in fp16, channels_last, inputs already on the GPU.
4. A table and the issue's targets per batch size: the fastest parity-passing artifact within 1.5x of
   torch.compile fp16 channels_last, and >= 8x faster than ONNX Runtime fp32. Exit 1 when one is missed.

Everything printed is also in WORK/summary.txt and WORK/results.json. ``--quick`` checks the script itself on
the CPU: ResNet-18 at 64x128, an fp32 AOTInductor CPU package, torch.compile fp32 as the reference (fp16 on a
CPU says nothing), and no targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.precision_cpu import train_briefly  # noqa: E402

# The targets, each per batch size.
MAX_VS_COMPILE = 1.5  # fastest passing artifact's compute time / torch.compile fp16 channels_last's
MIN_VS_ORT_FP32 = 8.0  # ONNX Runtime fp32's compute time / the fastest passing artifact's

FULL = dict(backbone="resnet50", height=1024, width=2048, steps=40, crop=256, batches=(1, 8),
            rows=("fp16:aoti", "fp16:onnxruntime"), device="cuda")
QUICK = dict(backbone="resnet18", height=64, width=128, steps=4, crop=64, batches=(1, 2), rows=("fp32:aoti",),
             device="cpu")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("gpu_precision_check", description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for data, checkpoint, artifacts, results")
    parser.add_argument("--quick", action="store_true", help="the dry path on a CPU (tiny sizes, no targets)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a trained checkpoint (skips the training; the data set is still generated)")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="PRECISION:RUNTIME rows of agmm_deploy.export.precision to export and time "
                        f"(default {' '.join(FULL['rows'])}; e.g. add bf16:aoti)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 8)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per candidate and batch size")
    parser.add_argument("--parity", type=int, default=4, help="labelled validation images for the gates")
    return parser


@dataclass
class Timing:
    """One candidate at one batch size: compute p50 (inputs and outputs on the device), and where measured the
    end-to-end p50; ``passed`` is its parity verdict (None for the references)."""

    name: str
    precision: str
    batch: int
    compute_ms: float
    e2e_ms: float | None
    passed: bool | None
    miou_delta: float | None = None


def parity_rows(folder: Path) -> dict[str, dict]:
    """artifact file name -> its parity.json entry (passed, miou_delta, ...)."""
    report = folder / "parity.json"
    if not report.is_file():
        return {}
    return {Path(b["artifact"]).name: b for b in json.loads(report.read_text()).get("backends", [])
            if b.get("artifact")}


def export_rows(checkpoint: Path, data: Path, work: Path, rows: list[str], size: tuple[int, int], device: str,
                parity: int, max_batch: int) -> tuple[Path | None, list[tuple[Path, dict]]]:
    """Runs agmm-export per row; returns the fp32 model.onnx and (artifact, parity entry) of every row written."""
    from agmm_deploy.cli.export import main as export_main

    baseline, artifacts = None, []
    for row in rows:
        precision, _, runtime = row.partition(":")
        out = work / f"export_{precision}_{runtime or 'default'}"
        start = time.perf_counter()
        code = export_main([str(checkpoint), "--height", str(size[0]), "--width", str(size[1]), "--device", device,
                            "--precision", precision, *(["--runtime", runtime] if runtime else []),
                            "--parity-images", str(data / "val"), "--parity-count", str(parity),
                            "--parity-batch", "1", "--max-batch", str(max_batch), "--out", str(out)])
        print(f"agmm-export --precision {precision} --runtime {runtime or '(default)'}: exit {code} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        entries = parity_rows(out)
        baseline = baseline or next((p for p in (out / "model.onnx",) if p.is_file()), None)
        for name, entry in entries.items():
            path = out / name
            if name != "model.onnx":  # the baseline, timed on its own
                artifacts.append((path if path.is_file() else path.with_name(path.name + ".failed"), entry))
    return baseline, artifacts


def compiled_reference(checkpoint: Path, device: str, half: bool):
    """torch.compile of the checkpoint's model: fp16 + channels_last on CUDA (the issue's reference), fp32 on the
    CPU. Returns (name, precision, call(images on device) -> logits)."""
    import torch

    from agmm_deploy.checkpoint import load_model

    model = load_model(checkpoint).model.to(device).eval()
    dtype = torch.float16 if half else torch.float32
    model = model.to(dtype=dtype, memory_format=torch.channels_last)
    compiled = torch.compile(model)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(x.to(dtype).contiguous(memory_format=torch.channels_last))

    return f"torch.compile {'fp16' if half else 'fp32'} channels_last", "fp16" if half else "fp32", run


def timed(calls: list, iters: int) -> list[tuple[float, float, int]]:
    from agmm_deploy.cli.bench import time_interleaved

    # Warm-up of 3: the first call of a compiled graph at a new batch size compiles; cuDNN picks algorithms.
    return time_interleaved(calls, iters, warmup=3, max_seconds=60.0)


def measure(checkpoint: Path, baseline: Path, artifacts: list[tuple[Path, dict]], batches: list[int], device: str,
            iters: int, half: bool) -> list[Timing]:
    import torch

    from agmm_deploy.cli.bench import compute_call, end_to_end_call
    from agmm_deploy.runtime import load_runner

    ort = load_runner(baseline, device)
    candidates = [(path, entry, load_runner(path, device)) for path, entry in artifacts if path.is_file()]
    name, ref_precision, reference = compiled_reference(checkpoint, device, half)
    h, w = ort.input_size
    timings: list[Timing] = []
    for batch in batches:
        rng = np.random.default_rng(0)
        images = rng.standard_normal((batch, 3, h, w)).astype(np.float32)
        rgb = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
        for runner in (ort, *(c[2] for c in candidates)):
            runner.max_batch = max(runner.max_batch, batch)
        x = torch.from_numpy(images).to(device)

        def reference_call() -> None:
            reference(x)
            if device == "cuda":
                torch.cuda.synchronize()

        calls = [compute_call(ort, images), end_to_end_call(ort, rgb), reference_call,
                 *(compute_call(c[2], images) for c in candidates)]
        results = timed(calls, iters)
        timings.append(Timing(f"{ort.backend} {ort.precision_used()}", "fp32", batch, results[0][0], results[1][0],
                              None))
        timings.append(Timing(name, ref_precision, batch, results[2][0], None, None))
        for (path, entry, runner), (p50, _, _) in zip(candidates, results[3:]):
            timings.append(Timing(f"{runner.backend} {path.name}", runner.precision_used(), batch, p50, None,
                                  bool(entry.get("passed")), entry.get("miou_delta")))
        print(f"batch {batch}: " + ", ".join(f"{t.name} {t.compute_ms:.1f} ms" for t in timings[-2 - len(candidates):]),
              flush=True)
    return timings


def verdicts(timings: list[Timing], batches: list[int], targets: bool) -> list[str]:
    """One line per batch size: the fastest passing artifact against the two references."""
    lines = []
    for batch in batches:
        at = [t for t in timings if t.batch == batch]
        ort, compiled = at[0], at[1]
        passing = [t for t in at[2:] if t.passed]
        if not passing:
            lines.append(f"FAIL batch {batch}: no artifact passed its parity gates")
            continue
        best = min(passing, key=lambda t: t.compute_ms)
        vs_compile, vs_ort = best.compute_ms / compiled.compute_ms, ort.compute_ms / best.compute_ms
        vs_e2e = ort.e2e_ms / best.compute_ms if ort.e2e_ms else float("nan")
        ok = vs_compile <= MAX_VS_COMPILE and vs_ort >= MIN_VS_ORT_FP32
        verdict = ("PASS" if ok else "FAIL") if targets else "INFO"
        lines.append(f"{verdict} batch {batch}: fastest passing {best.name} ({best.precision}) {best.compute_ms:.1f} ms "
                     f"= {vs_compile:.2f}x {compiled.name}'s {compiled.compute_ms:.1f} ms (target <= "
                     f"{MAX_VS_COMPILE}x); {vs_ort:.1f}x faster than ONNX Runtime fp32's {ort.compute_ms:.1f} ms "
                     f"compute (target >= {MIN_VS_ORT_FP32}x) and {vs_e2e:.1f}x its {ort.e2e_ms:.1f} ms end to end")
    return lines


def table(timings: list[Timing]) -> str:
    header = f"{'candidate':<48} {'precision':<14} {'batch':>5} {'compute ms':>10} {'e2e ms':>8} {'parity':>7} {'mIoU d':>7}"
    lines = [header, "-" * len(header)]
    for t in timings:
        parity = "-" if t.passed is None else ("PASS" if t.passed else "FAIL")
        lines.append(f"{t.name[:48]:<48} {t.precision:<14} {t.batch:>5} {t.compute_ms:>10.1f} "
                     f"{(f'{t.e2e_ms:.1f}' if t.e2e_ms else '-'):>8} {parity:>7} "
                     f"{(f'{t.miou_delta:+.2f}' if t.miou_delta is not None else '-'):>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    import torch

    plan = QUICK if args.quick else FULL
    device = plan["device"]
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_precision_check: error: no CUDA GPU here (torch.cuda.is_available() is False); run it on the GPU "
              "machine, or --quick for the dry path on the CPU", file=sys.stderr)
        return 2
    rows, batches = list(args.rows or plan["rows"]), list(args.batch or plan["batches"])
    size = (plan["height"], plan["width"])
    args.work.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.node()}: torch {torch.__version__}, "
               f"{torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'CPU'}, "
               f"load {os.getloadavg()[0]:.2f}")
    print(machine, flush=True)
    start = time.perf_counter()
    checkpoint = args.checkpoint or train_briefly(args.work, plan["backbone"], plan["steps"], plan["crop"], size)
    baseline, artifacts = export_rows(checkpoint, args.work / "data", args.work, rows, size, device, args.parity,
                                      max(batches))
    if baseline is None:
        print("gpu_precision_check: error: no fp32 model.onnx was written (see the export output above)",
              file=sys.stderr)
        return 1
    timings = measure(checkpoint, baseline, artifacts, batches, device, args.iters, half=not args.quick)
    lines = [machine, table(timings), *verdicts(timings, batches, targets=not args.quick),
             f"whole check {time.perf_counter() - start:.0f} s; load {os.getloadavg()[0]:.2f}"]
    print("\n".join(lines))
    (args.work / "summary.txt").write_text("\n".join(lines) + "\n")
    (args.work / "results.json").write_text(json.dumps([asdict(t) for t in timings], indent=1))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
