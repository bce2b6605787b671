"""Synthetic data sets in the real layouts of every data format, for tests, the demo and a first try.

Each class has its own colour and stripe texture, so a small network can learn them in minutes on a CPU; every
image comes with its full label and the sparse labels of the paper's settings, sampled from the full label.
What each format writes (and in which layout) is its row's ``write_synthetic`` (``agmm_deploy.datasets``):
Cityscapes {20,50,100}-click labels, VOC points and scribbles, or a folder data set with 20 clicks per image
and its classes.txt.

    python -m training.synthetic --dataset cityscapes --out data/city --num-train 40 --num-val 8 \\
        --height 128 --width 256 --seed 0
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agmm_deploy.datasets import DATA_FORMATS, get_format


@dataclass(frozen=True)
class SyntheticDataset:
    """What ``generate`` wrote: the data root and the number of images per split."""

    root: Path
    dataset: str
    num_train: int
    num_val: int


def generate(dataset: str, out: str | Path, num_train: int, num_val: int, height: int, width: int,
             seed: int = 0, click_radius: int = 2, progress: bool = True) -> SyntheticDataset:
    """Writes a synthetic data set in the layout of the data format ``dataset`` under ``out``.

    Image ``i`` of a split depends only on (seed, split, i), so data sets of different sizes share images.
    """
    row = get_format(dataset)
    if min(height, width) < 16 or num_train < 1 or num_val < 0:
        raise ValueError(f"need height, width >= 16, num_train >= 1 and num_val >= 0; got {height}x{width}, "
                         f"{num_train} train, {num_val} val")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ids: dict[str, list[str]] = {"train": [], "val": []}
    jobs = [("train", i) for i in range(num_train)] + [("val", i) for i in range(num_val)]
    for split, index in tqdm(jobs, desc=f"synthetic {dataset}", disable=not progress, unit="img"):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
        ids[split].append(row.write_synthetic(root, split, index, rng, height, width, click_radius))
    row.finish_synthetic(root, ids)
    return SyntheticDataset(root=root, dataset=dataset, num_train=num_train, num_val=num_val)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a synthetic data set in the layout of a data format")
    parser.add_argument("--dataset", choices=sorted(DATA_FORMATS), required=True)
    parser.add_argument("--out", required=True, help="data root to write")
    parser.add_argument("--num-train", type=int, default=40)
    parser.add_argument("--num-val", type=int, default=8)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--click-radius", type=int, default=2, help="radius in pixels of each click's disk")
    return parser


def main(argv: list[str] | None = None) -> SyntheticDataset:
    args = get_args_parser().parse_args(argv)
    result = generate(args.dataset, args.out, args.num_train, args.num_val, args.height, args.width, args.seed,
                      args.click_radius)
    print(f"wrote {result.num_train} train and {result.num_val} val images ({result.dataset} layout) to {result.root}")
    return result


if __name__ == "__main__":
    main()
