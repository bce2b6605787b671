"""Training speed in one run: the official formulation's step against ours with the defaults, and the loader alone.

    python benchmarks/train_speed.py                    # CUDA: paper scale (R50 OS8 multi-grid, batch 4, crop 721)
    python benchmarks/train_speed.py --device cpu       # CPU: resnet18, batch 2, crop 129 (--size/--batch/--backbone)

Rows (all in this process, one after the other, same model weights and batch):
  official   our DeepLabV3+ with the loss as the official code computes it (training/reference_losses.py), fp32,
             contiguous tensors: how the official code runs a step;
  ours fp32  our loss (training/losses.py), --amp none --memory-format contiguous: the exact fp32 path;
  ours       our loss with the defaults the training resolves for this device (training.config.resolve_for_device:
             bf16 autocast + channels_last on CUDA; on the CPU that is ours fp32, so the row is not repeated).
Each row: the mean step time (forward, loss, backward, SGD update), images/s, the loss's forward + backward
timed alone on the step's outputs and its share of the step, and the peak GPU memory of the step.
The loader row: images/s of decode + augment (scale, crop, flip, normalise) of Cityscapes-layout PNGs written by
training.synthetic (2048x1024 on CUDA), with the default workers (training.data.default_workers), pinned on CUDA.

Targets (issue 11, on a GPU at paper scale): ours >= 6x the official step, the loss <= 10 % of the step, peak
<= 12 GiB, the loader >= 1.5x ours' images/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agmm_deploy.constants import IGNORE_INDEX  # noqa: E402
from agmm_deploy.datasets import get_format  # noqa: E402
from agmm_deploy.model import BACKBONE_DEPTHS, ModelConfig, build_model  # noqa: E402
from training import synthetic  # noqa: E402
from training.config import TrainConfig, resolve_for_device  # noqa: E402
from training.data import SegmentationDataset, default_workers  # noqa: E402
from training.losses import agmm_losses  # noqa: E402
from training.reference_losses import official_loop_losses  # noqa: E402
from training.run import AMP_DTYPES, MEMORY_FORMAT_OF  # noqa: E402

# (size, batch, backbone, loader image height x width) when the flags say nothing.
PAPER_SCALE = dict(size=721, batch=4, backbone="resnet50", image=(1024, 2048))
CPU_SCALE = dict(size=129, batch=2, backbone="resnet18", image=(256, 512))


@dataclass(frozen=True)
class Setup:
    """One row: which loss, and the precision and memory format the network runs in."""

    name: str
    loss: object
    amp: str
    memory_format: str


@dataclass
class StepResult:
    name: str
    step_s: float
    loss_s: float
    peak_bytes: int | None
    images_per_s: float


def make_batch(batch: int, size: int, classes: int, clicks: int, device: torch.device, seed: int = 0):
    """Normalised images, a click mask (clicks 5x5 squares per image, K elsewhere, the bottom 1/8 crop padding)
    and cls_label, as the training loader gives them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    mask = torch.full((batch, size, size), classes, dtype=torch.long)
    for i in range(batch):
        ys, xs = torch.randint(0, size - 5, (clicks,), generator=g), torch.randint(0, size - 5, (clicks,), generator=g)
        for y, x, c in zip(ys.tolist(), xs.tolist(), torch.randint(0, classes, (clicks,), generator=g).tolist()):
            mask[i, y:y + 5, x:x + 5] = c
    mask[:, -size // 8:] = IGNORE_INDEX
    cls_label = torch.zeros(batch, classes)
    for i in range(batch):
        cls_label[i, mask[i][mask[i] < classes].unique()] = 1
    return images.to(device), mask.to(device), cls_label.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(setup: Setup, config: ModelConfig, batch, device: torch.device, steps: int, warmup: int,
               state: dict) -> StepResult:
    """Mean time of ``steps`` training steps after ``warmup`` (cudnn.benchmark and torch.compile settle there),
    then of the loss's forward + backward alone on the last step's outputs."""
    memory_format = MEMORY_FORMAT_OF[setup.memory_format]
    amp_dtype = AMP_DTYPES[setup.amp]
    torch.manual_seed(0)
    net = build_model(config)
    net.load_state_dict(state)
    net = net.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    images, mask, cls_label = batch
    images = images.contiguous(memory_format=memory_format)
    k = config.num_classes

    def forward():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return net.forward_train(images)

    def step():
        feat, logits = forward()
        total = setup.loss(feat, logits, mask, cls_label, k)["total"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in tqdm(range(warmup + steps), desc=f"{setup.name} steps", leave=False, dynamic_ncols=True):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    with torch.no_grad():
        feat, logits = forward()
    loss_times = []
    for i in range(warmup + steps):
        f, z = feat.detach().requires_grad_(), logits.detach().requires_grad_()
        _sync(device)
        start = time.perf_counter()
        setup.loss(f, z, mask, cls_label, k)["total"].backward()
        _sync(device)
        if i >= warmup:
            loss_times.append(time.perf_counter() - start)
    del net, optimizer, feat, logits
    step_s = sum(times) / len(times)
    return StepResult(setup.name, step_s, sum(loss_times) / len(loss_times), peak, images.shape[0] / step_s)


def loader_images_per_s(root: Path, size: int, batch: int, workers: int, pin: bool, min_images: int) -> float:
    """Images/s of the training loader (decode + augment + normalise + collate) after its first batch."""
    row = get_format("cityscapes")
    samples = row.train_samples(root, {**row.flag_defaults(), "clicks": 20})
    dataset = SegmentationDataset(samples, 19, train=True, crop_size=size)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=pin,
                        drop_last=True, persistent_workers=workers > 0)
    passes = max(1, -(-min_images // (len(loader) * batch)))
    seen, start = 0, None
    with tqdm(total=passes * len(loader) * batch, desc="loader images", leave=False, dynamic_ncols=True) as bar:
        for epoch in range(passes):
            dataset.set_epoch(epoch)
            for images, *_ in loader:
                bar.update(images.shape[0])
                if start is None:  # the first batch carries the workers' start-up
                    start = time.perf_counter()
                    continue
                seen += images.shape[0]
    return seen / (time.perf_counter() - start) if seen else float("nan")


def format_table(results: list[StepResult], loader: float | None, workers: int, device: torch.device) -> str:
    """The printed table: one row per setup with ratios to the official step, then the loader."""
    base = results[0]
    lines = ["| row | step ms | images/s | vs official | loss fwd+bwd ms | loss share | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        peak = f"{r.peak_bytes / 2**30:.2f}" if r.peak_bytes is not None else "n/a (CPU)"
        lines.append(f"| {r.name} | {r.step_s * 1000:.1f} | {r.images_per_s:.2f} | {base.step_s / r.step_s:.2f}x | "
                     f"{r.loss_s * 1000:.1f} | {100 * r.loss_s / r.step_s:.1f} % | {peak} |")
    if loader is not None:
        ours = results[-1]
        lines.append(f"| loader ({workers} workers{', pinned' if device.type == 'cuda' else ''}) | | {loader:.2f} | "
                     f"{loader / ours.images_per_s:.2f}x {ours.name}'s images/s | | | |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, help="crop size (default 721 on CUDA, 129 on the CPU)")
    p.add_argument("--batch", type=int, help="images per step (default 4 on CUDA, 2 on the CPU)")
    p.add_argument("--backbone", choices=sorted(BACKBONE_DEPTHS), help="default resnet50 on CUDA, resnet18 on CPU")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--clicks", type=int, default=20, help="labelled 5x5 squares per image")
    p.add_argument("--steps", type=int, help="timed steps per row (default 20 on CUDA, 2 on the CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5 on CUDA, 1 on the CPU)")
    p.add_argument("--skip-official", action="store_true", help="no official row (its loss loops are slow)")
    p.add_argument("--data-root", help="Cityscapes-layout data for the loader row (default: written here by "
                                       "training.synthetic into a temporary folder)")
    p.add_argument("--loader-images", type=int, help="synthetic images to write (default 48 on CUDA, 4 on the CPU)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                   help="synthetic image size (default 1024 2048 on CUDA, 256 512 on the CPU)")
    p.add_argument("--workers", type=int, help="loader workers (default training.data.default_workers())")
    p.add_argument("--skip-loader", action="store_true")
    return p


def step_shape(args: argparse.Namespace, device: torch.device) -> tuple[int, int, str]:
    """(crop size, batch size, backbone) of a timed step: the paper's scale on CUDA, a small one on the CPU,
    each overridden by --size / --batch / --backbone."""
    scale = PAPER_SCALE if device.type == "cuda" else CPU_SCALE
    return args.size or scale["size"], args.batch or scale["batch"], args.backbone or scale["backbone"]


def main(argv: list[str] | None = None) -> str:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    size, batch_size, backbone = step_shape(args, device)
    steps = args.steps or (20 if device.type == "cuda" else 2)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training.run
    auto = TrainConfig(dataset="cityscapes", data_root="", out="", backbone=backbone, multi_grid=True,
                       aspp_rates=(12, 24, 36), crop_size=size, epochs=1, batch_size=batch_size, lr=0.01,
                       head_lr_mult=10.0, colour_aug=False)
    defaults = resolve_for_device(auto, device)
    setups = [Setup("official", official_loop_losses, "none", "contiguous"),
              Setup("ours fp32", agmm_losses, "none", "contiguous")]
    if (defaults.amp, defaults.memory_format) != ("none", "contiguous"):
        setups.append(Setup(f"ours ({defaults.amp}, {defaults.memory_format})", agmm_losses, defaults.amp,
                            defaults.memory_format))
    if args.skip_official:
        setups = setups[1:]
    config = ModelConfig.cityscapes(backbone=backbone, num_classes=args.classes)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}: DeepLabV3+ {backbone} OS{config.output_stride}"
          f"{' multi-grid' if config.multi_grid else ''}, batch {batch_size}, crop {size}, {args.classes} classes, "
          f"{args.clicks} clicks/image; {steps} timed steps after {warmup}")
    torch.manual_seed(0)
    state = build_model(config).state_dict()
    batch = make_batch(batch_size, size, args.classes, args.clicks, device)
    results = []
    for setup in setups:
        results.append(time_steps(setup, config, batch, device, steps, warmup, state))
        r = results[-1]
        print(f"  {r.name}: step {r.step_s * 1000:.1f} ms, loss {r.loss_s * 1000:.1f} ms", flush=True)

    loader, workers = None, args.workers if args.workers is not None else default_workers()
    if not args.skip_loader:
        height, width = args.image_size or (PAPER_SCALE if device.type == "cuda" else CPU_SCALE)["image"]
        count = args.loader_images or (48 if device.type == "cuda" else 4)
        with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
            root = Path(args.data_root) if args.data_root else synthetic.generate(
                "cityscapes", tmp, num_train=max(count, batch_size), num_val=0, height=height, width=width).root
            loader = loader_images_per_s(root, size, batch_size, workers, device.type == "cuda",
                                         min_images=4 * count)
    table = format_table(results, loader, workers, device)
    print(table)
    return table


if __name__ == "__main__":
    main()
