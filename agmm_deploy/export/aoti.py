"""PyTorch -> AOTInductor package (.pt2): the model compiled ahead of time for one device and one precision.

``torch.export`` captures the model, ``torch._inductor.aoti_compile_and_package`` compiles it to a shared library
(C++/OpenMP kernels on the CPU, Triton kernels on CUDA) and packs it, weights included, into one zip file that
``torch._inductor.aoti_load_package`` runs without Python model code and without compiling at load time. This is
what ``torch.compile`` does just in time, done once at export (why fp16/bf16 on CUDA default to it: docs/export.md,
with the published figures on docs/benchmarks.md).

The package takes float32 normalised images (N, 3, H, W) and returns float32 logits (N, K, H, W), the contract of
every runner; the cast to fp16/bf16 (and to channels_last) happens inside, so callers never see the precision.
The metadata (agmm_deploy.contract: ModelMeta plus precision, device, versions, ...) is stored in the package's
own AOTInductor metadata (``read_aoti_metadata`` reads it back without loading the library).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from agmm_deploy.atomic import atomic_write
from agmm_deploy.checkpoint import unwrap
from agmm_deploy.contract import ModelMeta, aoti_metadata_config, library_versions
from agmm_deploy.export.onnx import INPUT_NAME, LOGITS_NAME, check_meta_matches_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Modules kept in float32 in fp16/bf16 packages (names in DeepLabV3Plus):
# - head.b4, the ASPP image pooling: a mean over every position of the stride-8 feature map (64x128 at
#   512x1024), a sum of thousands of terms that loses digits in 8 (bf16) or 11 (fp16) bits of mantissa;
# - classifier, so that the final bilinear upsample (x4, in forward_train after it) interpolates float32
#   logits: neighbours whose difference fp16 rounds away would otherwise flip near-tied argmaxes.
# Both are cheap (a 1x1 map, and a 1x1 conv to K channels at stride 4). The same ops stay float32 in the fp16
# ONNX model (agmm_deploy.export.precision.FP16_KEEP_FP32_OPS). benchmarks/aoti_keep_fp32.py measures the
# argmax agreement with and without each (docs/benchmarks.md, "AOTInductor: what stays float32"): the float32
# classifier is what bf16 needs; the pooling is kept for full-size inputs.
KEEP_FP32_MODULES = ("head.b4", "classifier")


@dataclass(frozen=True)
class AotiExport:
    """What export_aoti wrote."""

    path: Path
    precision: str
    device: str
    input_size: tuple[int, int]
    dynamic_batch: bool
    max_batch: int
    channels_last: bool
    keep_fp32: tuple[str, ...]
    size_bytes: int
    export_seconds: float
    compile_seconds: float


class Float32Island(nn.Module):
    """Runs ``module`` in float32 on a reduced-precision input and returns ``out_dtype``."""

    def __init__(self, module: nn.Module, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module.float()
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).to(self.out_dtype)


class CastModel(nn.Module):
    """float32 images in, float32 logits out; the model in between runs at ``dtype`` (channels_last if asked),
    except the modules named in ``keep_fp32``, which run in float32.

    Shape:
        x: (N, 3, H, W) float32 normalised RGB. returns: (N, K, H, W) float32 logits.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype, channels_last: bool,
                 keep_fp32: tuple[str, ...] = KEEP_FP32_MODULES) -> None:
        super().__init__()
        net = copy.deepcopy(net).eval()  # the caller's model keeps its dtype and layout
        if dtype != torch.float32:
            islands = {name: net.get_submodule(name) for name in keep_fp32}
            net = net.to(dtype)
            for name, module in islands.items():
                parent, _, child = name.rpartition(".")
                # The island's output feeds the next low-precision layer, except the classifier's, which is
                # upsampled to the logits (float32 from there on).
                out_dtype = torch.float32 if name == "classifier" else dtype
                setattr(net.get_submodule(parent), child, Float32Island(module, out_dtype))
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).float()


def compile_package(program: "torch.export.ExportedProgram", out_path: Path, metadata: dict[str, str]) -> None:
    """aoti_compile_and_package straight into agmm_deploy.atomic's temporary file (it takes a seekable buffer):
    a reader, or a compile killed half-way (minutes for a large model), never sees half a package."""
    atomic_write(out_path, lambda f: torch._inductor.aoti_compile_and_package(
        program, package_path=f, inductor_configs={"aot_inductor.metadata": metadata}))


def export_aoti(model: nn.Module, meta: ModelMeta, out_path: str | Path, *, height: int, width: int,
                precision: str = "fp32", device: str = "cpu", max_batch: int = 8, dynamic_batch: bool = True,
                checkpoint_sha256: str | None = None, channels_last: bool = True,
                keep_fp32: tuple[str, ...] = KEEP_FP32_MODULES) -> AotiExport:
    """Compiles the model's ``forward`` into an AOTInductor package for ``device`` at ``precision``.

    Args:
        model: the DeepLabV3Plus (any wrapper is removed; it is copied, not changed).
        meta: classes, palette, mean/std; stored with ``input_size=(height, width)``.
        out_path: the .pt2 file to write (parent folders are created; the write is atomic).
        height, width: the fixed input size.
        precision: fp32 | fp16 | bf16: what the layers compute in; inputs and logits stay float32.
        device: cpu | cuda: the package runs there only (its kernels are compiled for it).
        max_batch: the largest batch of the symbolic batch dimension (runners split bigger batches).
        dynamic_batch: a batch of 1..max_batch; otherwise exactly one image.
        checkpoint_sha256: sha256 of the source checkpoint, recorded for traceability.
        channels_last: NHWC activations (default): tensor-core convolutions want NHWC on CUDA, and on the CPU
            it was the faster layout too (docs/benchmarks.md, "AOTInductor on the CPU").
        keep_fp32: modules that stay float32 at fp16/bf16 (KEEP_FP32_MODULES; empty to measure without).
    Returns:
        AotiExport describing the file.
    Raises:
        ValueError: an unknown precision/device, an out_path not ending in .pt2, or meta not fitting the model.
        RuntimeError: device='cuda' on a machine without CUDA.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r} is not supported by export_aoti; expected one of "
                         f"{', '.join(DTYPES)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported by export_aoti; expected cpu or cuda (a package "
                         "is compiled for one device)")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("an AOTInductor package for device='cuda' is compiled on a CUDA GPU, and "
                           "torch.cuda.is_available() is False on this machine; export for device='cpu'")
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".pt2":
        raise ValueError(f"an AOTInductor package is a .pt2 file; got {out_path.name}. Name it e.g. "
                         f"{out_path.with_suffix('.pt2').name}")
    check_meta_matches_model(model, meta)
    keep_fp32 = tuple(keep_fp32) if precision != "fp32" else ()
    start = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    net = unwrap(model)
    wrapper = CastModel(net, DTYPES[precision], channels_last, keep_fp32).to(device)
    # An example batch of 2: torch.export specialises dimensions whose example value is 1 (and a dimension
    # must be allowed 2 to be symbolic at all, hence max >= 2).
    example = torch.zeros(2 if dynamic_batch else 1, 3, height, width, device=device)
    shapes = ({0: torch.export.Dim("batch", min=1, max=max(2, max_batch))},) if dynamic_batch else None
    with torch.no_grad():
        program = torch.export.export(wrapper, (example,), dynamic_shapes=shapes)
    exported = time.perf_counter()
    meta = ModelMeta(**{**meta.to_dict(), "input_size": (height, width)})
    metadata = aoti_metadata_config(
        meta, precision=precision, device=device, runtime="aoti", versions=library_versions(),
        checkpoint_sha256=checkpoint_sha256, dynamic_batch=dynamic_batch, dynamic_hw=False,
        max_batch=(max_batch if dynamic_batch else 1), input=INPUT_NAME, outputs=[LOGITS_NAME],
        channels_last=channels_last, keep_fp32=list(keep_fp32),
        model_config=(net.config.to_dict() if hasattr(net, "config") else None),
    )
    compile_package(program, out_path, metadata)
    del program, wrapper
    return AotiExport(path=out_path, precision=precision, device=device, input_size=(height, width),
                      dynamic_batch=dynamic_batch, max_batch=(max_batch if dynamic_batch else 1),
                      channels_last=channels_last, keep_fp32=keep_fp32, size_bytes=out_path.stat().st_size,
                      export_seconds=exported - start, compile_seconds=time.perf_counter() - exported)
