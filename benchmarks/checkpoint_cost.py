"""The cost of a mid-epoch checkpoint: one save of last.pt as training.run writes it, against a training step.

    python benchmarks/checkpoint_cost.py                    # CUDA: paper scale (R50 OS8 multi-grid, batch 4, crop 721)
    python benchmarks/checkpoint_cost.py --device cpu       # CPU: resnet18, batch 2, crop 129
    python benchmarks/checkpoint_cost.py --out /mnt/ckpt    # on the disk the run writes to (default: a temp dir)

Rows: the training step (ours fp32 on the CPU, the device's defaults on CUDA; benchmarks/train_speed.py's step),
the weight check before every save (NaN/Inf and magnitude, training.run.unsound_weights), and the save itself:
model, optimiser (momentum buffers), scheduler and position through torch.save into a temporary file, fsync and
rename (agmm_deploy.checkpoint.save_checkpoint). The save's share is given per step, at --save-every 100, and at
the default interval (training.config.SAVE_EVERY_SECONDS of training); target: < 1 % at the default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agmm_deploy.checkpoint import save_checkpoint  # noqa: E402
from agmm_deploy.contract import ModelMeta  # noqa: E402
from agmm_deploy.model import BACKBONE_DEPTHS, ModelConfig, build_model  # noqa: E402
from benchmarks.train_speed import Setup, make_batch, step_shape, time_steps  # noqa: E402
from training.config import SAVE_EVERY_SECONDS, TrainConfig, resolve_for_device  # noqa: E402
from training.losses import agmm_losses  # noqa: E402
from training.run import unsound_weights  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def time_saves(config: ModelConfig, meta: ModelMeta, device: torch.device, folder: Path,
               saves: int) -> tuple[float, float, int]:
    """(mean seconds of the weight check, mean seconds of one save, bytes of the file) for a model whose optimiser
    holds momentum buffers, as after the first step of a run."""
    torch.manual_seed(0)
    net = build_model(config).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the momentum buffers a real checkpoint carries
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    args = {"dataset": "cityscapes", "batch_size": 2}
    checks, times = [], []
    path = folder / "last.pt"
    for step in range(saves + 1):
        start = time.perf_counter()
        assert unsound_weights(net, step) is None
        checked = time.perf_counter()
        save_checkpoint(path, net, meta, args=args, epoch=0, step=step, best_miou=0.0, world_size=1,
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=None,
                        total_steps=1000, mid_epoch=True, epoch_images=step * 2, miou=None)
        if step:  # the first save carries the page cache's warm-up
            checks.append(checked - start)
            times.append(time.perf_counter() - checked)
    return statistics.mean(checks), statistics.mean(times), path.stat().st_size


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, help="crop size (default 721 on CUDA, 129 on the CPU)")
    p.add_argument("--batch", type=int, help="images per step (default 4 on CUDA, 2 on the CPU)")
    p.add_argument("--backbone", choices=sorted(BACKBONE_DEPTHS), help="default resnet50 on CUDA, resnet18 on CPU")
    p.add_argument("--steps", type=int, help="timed steps (default 20 on CUDA, 3 on the CPU)")
    p.add_argument("--saves", type=int, default=3, help="timed saves")
    p.add_argument("--out", help="folder to save into (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> str:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    size, batch_size, backbone = step_shape(args, device)
    steps = args.steps or (20 if device.type == "cuda" else 3)
    config = ModelConfig.cityscapes(backbone=backbone)
    defaults = resolve_for_device(TrainConfig(dataset="cityscapes", data_root="", out="", backbone=backbone,
                                              multi_grid=True, aspp_rates=(12, 24, 36), crop_size=size, epochs=1,
                                              batch_size=batch_size, lr=0.01, head_lr_mult=1.0, colour_aug=False),
                                  device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{cpu_model()}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    state = build_model(config).state_dict()
    step = time_steps(Setup("step", agmm_losses, defaults.amp, defaults.memory_format), config,
                      make_batch(batch_size, size, config.num_classes, 20, device), device, steps, 1, state)
    with tempfile.TemporaryDirectory(prefix="checkpoint_cost_") as tmp:
        folder = Path(args.out) if args.out else Path(tmp)
        check_s, save_s, size_bytes = time_saves(config, ModelMeta.for_dataset("cityscapes", (size, size)), device,
                                                  folder, args.saves)
    per_save = check_s + save_s
    lines = [f"{name}, torch {torch.__version__}: DeepLabV3+ {backbone}, batch {batch_size}, crop {size}, "
             f"{defaults.amp}/{defaults.memory_format}; checkpoint {size_bytes / 2**20:.0f} MiB in "
             f"{args.out or 'a temporary folder'}",
             "| row | ms | share |", "|---|---:|---:|",
             f"| training step | {step.step_s * 1000:.1f} | |",
             f"| weight check before a save | {check_s * 1000:.1f} | |",
             f"| save (torch.save + fsync + rename) | {save_s * 1000:.1f} | "
             f"{100 * per_save / step.step_s:.0f} % of one step |",
             f"| at --save-every 100 | | {100 * per_save / (per_save + 100 * step.step_s):.2f} % of training |",
             f"| at the default, every {SAVE_EVERY_SECONDS // 60} min | | "
             f"{100 * per_save / (per_save + SAVE_EVERY_SECONDS):.3f} % of training |"]
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
