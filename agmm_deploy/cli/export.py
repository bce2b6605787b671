"""agmm-export CKPT: checkpoint -> model.onnx (+ the artifact of one row of the precision table) -> parity against
PyTorch -> parity.json.

``--precision tf32|fp16|bf16|int8`` adds a model of that precision from the precision table
(agmm_deploy.export.precision: on a GPU fp16/bf16 AOTInductor packages, tf32 ONNX for onnxruntime-cuda; for the
CPU a bf16 or NNCF-int8 OpenVINO IR, or with ``--runtime onnxruntime`` an ONNX Runtime int8 model; ``--precision
fp32 --runtime aoti`` an fp32 AOTInductor package for the --device); ``--runtime tensorrt`` (short: ``--trt``)
the TensorRT engine of the precision, model.engine. The device the export targets (``--device``, auto = CUDA
when available) picks between rows of one precision.

Exit codes: 0 exported and every parity gate held; 1 a parity gate failed (the artifacts are renamed to
``<name>.failed`` so that nothing deploys them); 2 unusable checkpoint, arguments, image folders or output
folder, or an I/O error while writing (e.g. a full disk); 3 a TensorRT engine asked for but TensorRT or a CUDA
GPU is missing (the ONNX model is still written and checked); 4 writing the precision's artifact failed (e.g.
TensorRT failed to build the engine).
"""

from __future__ import annotations

import argparse
import gc
import resource
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agmm_deploy.checkpoint import raw_recipes
from agmm_deploy.cli import class_names, positive_int
from agmm_deploy.export.precision import PRECISIONS, get_precision, precision_names

TRT_RUNTIME = "tensorrt"  # the runtime --trt is short for

EXIT_OK, EXIT_PARITY, EXIT_USAGE, EXIT_NO_TRT, EXIT_BUILD = 0, 1, 2, 3, 4


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "agmm-export", description="Export a checkpoint to ONNX (and TensorRT) and check parity with PyTorch.")
    parser.add_argument("checkpoint", type=Path, help="our .pt checkpoint, or a raw official AGMM state dict")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <checkpoint folder>/<checkpoint stem>_export)")
    parser.add_argument("--trt", action="store_true", help="short for --runtime tensorrt: also build the TensorRT "
                        "engine of --precision, model.engine (needs TensorRT + GPU)")
    parser.add_argument("--precision", default="fp32", choices=precision_names(),
                        help="fp16/bf16 on a GPU: also model.fp16/bf16.pt2 (AOTInductor; --runtime onnxruntime: "
                        "model.fp16.onnx); tf32: also model.tf32.onnx for onnxruntime-cuda; bf16 for the CPU: also "
                        "model.bf16.xml (OpenVINO, CPUs with native bf16); int8: also model.int8.xml (OpenVINO + "
                        "NNCF) or model.int8.onnx (--runtime onnxruntime), both need --calib-images; fp32 with "
                        "--runtime aoti: also model.fp32.pt2; with --runtime tensorrt (--trt), the engine's precision")
    parser.add_argument("--runtime", default=None, choices=sorted({p.runtime for p in PRECISIONS}),
                        help="which runtime's artifact to write for --precision (default: the precision's first "
                        "row for --device in agmm_deploy.export.precision, the faster one measured)")
    parser.add_argument("--calib-images", type=Path, default=None, help="folder of images for int8 calibration")
    parser.add_argument("--calib-count", type=positive_int, default=64, help="at most this many calibration images")
    parser.add_argument("--height", type=positive_int, default=None, help="input height (default: the training crop)")
    parser.add_argument("--width", type=positive_int, default=None, help="input width (default: the training crop)")
    parser.add_argument("--max-batch", type=positive_int, default=8,
                        help="largest batch of the TensorRT profile / runners")
    parser.add_argument("--no-dynamic-batch", action="store_true", help="fix the batch dimension to 1")
    parser.add_argument("--dynamic-hw", action="store_true", help="symbolic height/width in the ONNX and engine")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (the exporter emits at least 18)")
    parser.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim")
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace")

    parity = parser.add_argument_group("parity")
    parity.add_argument("--parity-images", type=Path, default=None,
                        help="folder of images (DIR or DIR/images) with optional labels DIR/labels/<stem>.png")
    parity.add_argument("--parity-count", type=positive_int, default=2,
                        help="images to compare (generated or from DIR)")
    parity.add_argument("--parity-batch", type=positive_int, default=None, help="batch size of the parity runs "
                        "(default: 2 with a dynamic batch, so the symbolic dimension is exercised)")
    parity.add_argument("--no-parity", action="store_true", help="skip the parity check (not recommended)")
    parity.add_argument("--atol", type=float, default=None,
                        help="absolute logits tolerance: with --atol or --rtol the gate is numpy's allclose, "
                             "|diff| <= atol + rtol*|ref| (fp32's default adds 1e-5 * the image's max|ref|)")
    parity.add_argument("--rtol", type=float, default=None,
                        help="relative logits tolerance, per element (see --atol)")
    parity.add_argument("--min-agreement", type=float, default=None,
                        help="override the argmax agreement gate (a fraction, e.g. 0.999)")
    parity.add_argument("--max-miou-delta", type=float, default=None, help="override the mIoU delta gate (points)")
    parity.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="the device the export targets (picks the --precision row; what an AOTInductor "
                        "package is compiled for) and where the parity check runs")

    raw = parser.add_argument_group("raw official state dicts")
    raw.add_argument("--backbone", default=None, help="e.g. resnet101")
    raw.add_argument("--num-classes", type=int, default=None, help="e.g. 21")
    raw.add_argument("--dataset", default=None, choices=raw_recipes(),
                     help="the official recipe it was trained with: selects ASPP rates/multi-grid and class names")
    raw.add_argument("--classes", type=class_names, default=None,
                     help="comma-separated class names, for a model trained on other classes than the recipe's")
    return parser


class UsageError(Exception):
    """An argument, input or output folder that cannot work; the message is one sentence (exit 2)."""


@dataclass
class Job:
    """What the checks before the expensive work resolved: the model, the sizes, the images, the folder."""

    loaded: Any  # agmm_deploy.checkpoint.LoadedModel
    sha256: str
    precision: Any  # the row of agmm_deploy.export.precision
    device: str  # cpu | cuda: what the export targets
    size: tuple[int, int]
    out: Path
    calib: Any = None  # normalised float32 (N, 3, H, W) for int8 calibration
    images: Any = None  # normalised float32 (N, 3, H, W) for parity
    labels: Any = None  # uint8 (N, H, W) or None
    source: str = ""
    skipped: str | None = None  # why the precision's row cannot be written here (a skip_when_missing row)


def check_output_folder(out: Path, need_bytes: int) -> None:
    """Refuses an --out that is a file, cannot be created or written, or lacks the space the artifacts need."""
    from agmm_deploy.runtime import model_suffixes

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a folder to write model.onnx and parity.json into")
    if not out.exists() and out.suffix.lower() in model_suffixes():
        raise UsageError(f"--out {out} looks like a model file; --out takes a folder (model.onnx and "
                         f"parity.json are written into it), e.g. --out {out.with_suffix('')}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to --out {out} ({err.strerror or err}); choose a folder you can "
                         "write to") from None
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise UsageError(f"--out {out} has {free / 1e6:.0f} MB free; the artifacts need about "
                         f"{need_bytes / 1e6:.0f} MB. Free some space or choose another --out")


def prepare(args: argparse.Namespace) -> Job:
    """Every check that can fail fast, before anything is exported: flags, checkpoint, metadata against the
    model, image folders, output folder. Raises UsageError."""
    from agmm_deploy.checkpoint import CheckpointError, load_model, sha256_file
    from agmm_deploy.export.onnx import check_meta_matches_model
    from agmm_deploy.export.parity import generated_images, load_parity_images
    from agmm_deploy.runtime import resolve_device
    from agmm_deploy.transforms import normalize

    if args.trt and args.runtime not in (None, TRT_RUNTIME):
        raise UsageError(f"--trt is short for --runtime {TRT_RUNTIME}; got --runtime {args.runtime} as well. Drop "
                         "one of them")
    runtime = TRT_RUNTIME if args.trt else args.runtime
    try:
        device = resolve_device(args.device)
        precision = get_precision(args.precision, runtime, device)
    except (ValueError, RuntimeError) as err:
        raise UsageError(str(err)) from None
    skipped = precision.missing(device) if precision.missing is not None else None
    if skipped and not precision.skip_when_missing:
        others = [p.runtime for p in PRECISIONS if p.name == precision.name and p is not precision]
        raise UsageError(f"--precision {precision.name} ({precision.runtime}) cannot be written here: {skipped}"
                         + "".join(f"; --runtime {other} writes the {other} one" for other in others))
    if precision.calibrated and args.calib_images is None:
        raise UsageError(f"--precision {precision.name} needs --calib-images DIR (a few dozen representative "
                         "images)")
    try:
        loaded = load_model(args.checkpoint, backbone=args.backbone, num_classes=args.num_classes,
                            dataset=args.dataset, classes=args.classes)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    try:
        check_meta_matches_model(loaded.model, loaded.meta)
    except ValueError as err:
        raise UsageError(f"{args.checkpoint}: {err}") from None
    size = (args.height or loaded.meta.input_size[0], args.width or loaded.meta.input_size[1])
    out = args.out or args.checkpoint.parent / f"{args.checkpoint.stem}_export"
    job = Job(loaded, "", precision, device, size, out, skipped=skipped)
    # Image folders are read first, so that a wrong path fails in a second rather than after the export.
    try:
        if precision.calibrated:
            job.calib, _, _ = load_parity_images(args.calib_images, loaded.meta, size, limit=args.calib_count)
        if args.parity_images is not None and not args.no_parity:
            job.images, job.labels, _ = load_parity_images(args.parity_images, loaded.meta, size,
                                                           limit=args.parity_count)
            job.source = f"{args.parity_images}{' labelled' if job.labels is not None else ''}"
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    if job.images is None and not args.no_parity:
        job.images = normalize(generated_images(loaded.meta, args.parity_count, size), loaded.meta.mean,
                               loaded.meta.std)
        job.source = "generated (seed 0)"
    # fp32 weights dominate every artifact: the ONNX file, and as much again for an engine.
    weights = sum(t.numel() * 4 for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    check_output_folder(job.out, (1 + (precision.convert is not None)) * weights + (1 << 20))
    job.sha256 = sha256_file(args.checkpoint)
    return job


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # Linux reports KiB


def _fail(message: str, code: int) -> int:
    print(f"agmm-export: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        job = prepare(args)
    except UsageError as err:
        return _fail(str(err), EXIT_USAGE)
    try:
        return _export(args, job)
    except OSError as err:  # a full disk, a folder removed under us: a sentence, not a traceback
        where = err.filename or job.out
        return _fail(f"writing {where} failed ({err.strerror or err}); free some space or choose another --out",
                     EXIT_USAGE)


def _export(args: argparse.Namespace, job: Job) -> int:
    import torch

    from agmm_deploy.export.onnx import export_onnx
    from agmm_deploy.export.parity import check_artifacts, set_aside
    from agmm_deploy.export.precision import convert_precision
    from agmm_deploy.runtime.pytorch import TorchRunner

    meta, config = job.loaded.meta, job.loaded.config
    (height, width), out = job.size, job.out
    print(f"agmm-export: {args.checkpoint} (sha256 {job.sha256[:12]}): DeepLabV3+ {config.backbone} ({config.stem} "
          f"stem, OS {config.output_stride}), {meta.num_classes} classes, input {height}x{width}")
    precision = job.precision
    convert = precision.convert is not None and not job.skipped
    steps = 2 + convert + (not args.no_parity)
    step = 1
    print(f"[{step}/{steps}] exporting ONNX (opset {args.opset}, dynamic batch "
          f"{'no' if args.no_dynamic_batch else 'yes'}, dynamic H/W {'yes' if args.dynamic_hw else 'no'})", flush=True)
    exported = export_onnx(job.loaded.model, meta, out / "model.onnx", height=height, width=width, opset=args.opset,
                           dynamic_batch=not args.no_dynamic_batch, dynamic_hw=args.dynamic_hw,
                           simplify=args.simplify, checkpoint_sha256=job.sha256, max_batch=args.max_batch)
    batch_dim = "1" if args.no_dynamic_batch else "batch"
    hw = "height,width" if args.dynamic_hw else f"{height},{width}"
    print(f"      wrote {exported.path} ({exported.size_bytes / 1e6:.1f} MB, opset {exported.opset}, "
          f"image ({batch_dim},3,{hw}) -> {' + '.join(exported.outputs)}, onnx.checker OK) in "
          f"{exported.seconds:.1f} s")
    artifacts = [exported.path]

    if convert:
        step += 1
        target = job.device if precision.device == "any" else precision.device
        print(f"[{step}/{steps}] {'compiling' if precision.runtime == 'aoti' else 'converting to'} {precision.name} "
              f"for {precision.runtime} on {target}"
              f"{f' ({len(job.calib)} calibration images)' if precision.calibrated else ''}", flush=True)
        try:
            converted = convert_precision(exported.path, out / precision.file_name, precision.name, job.calib,
                                          runtime=precision.runtime, model=job.loaded.model, device=job.device,
                                          workspace_gb=args.workspace_gb)
        except (RuntimeError, ValueError) as err:  # e.g. TensorRT could not build the engine
            return _fail(f"writing {precision.file_name} ({precision.name}, {precision.runtime}) failed: {err}",
                         EXIT_BUILD)
        print(f"      wrote {converted.path} ({converted.size_bytes / 1e6:.1f} MB, {converted.precision}, for "
              f"{converted.device}) in {converted.seconds:.1f} s")
        artifacts.append(converted.path)

    code = EXIT_OK
    if not args.no_parity:
        step += 1
        batch = args.parity_batch or (1 if args.no_dynamic_batch else min(2, args.max_batch))
        print(f"[{step}/{steps}] parity on {len(job.images)} image(s), batch {batch}", flush=True)
        # The exported program and the ONNX proto are gone; collect before ONNX Runtime allocates its arena.
        gc.collect()
        # The reference is strict fp32: PyTorch lets cuDNN convolutions use TF32 by default on Ampere and later.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        reference = TorchRunner(args.checkpoint, args.device, model=job.loaded.model, meta=meta)
        result = check_artifacts(reference, artifacts, job.images, job.labels, device=args.device,
                                 batch_size=batch, source=job.source, progress=True, atol=args.atol,
                                 rtol=args.rtol, min_agreement=args.min_agreement,
                                 max_miou_delta=args.max_miou_delta)
        print(result.table())
        result.write_json(out / "parity.json")
        print(f"      wrote {out / 'parity.json'}")
        if not result.passed:
            code = EXIT_PARITY
            moved = set_aside([Path(b.artifact) for b in result.backends if not b.passed])
    step += 1
    print(f"[{step}/{steps}] done: {out} (peak RSS {_peak_rss_gib():.2f} GiB)")
    if code == EXIT_PARITY:
        print(f"agmm-export: parity FAILED: an exported model does not match PyTorch within the gates above, so it "
              f"was renamed to {', '.join(p.name for p in moved)} where nothing deploys it", file=sys.stderr)
        return code
    if job.skipped:
        print(f"agmm-export: {job.skipped}, so {precision.file_name} was not written (the ONNX model was written and "
              "checked).", file=sys.stderr)
        return EXIT_NO_TRT
    return code


if __name__ == "__main__":
    sys.exit(main())
