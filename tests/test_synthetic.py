"""Synthetic data sets: the real layouts, sparse labels drawn from the full labels, determinism."""

import numpy as np
import pytest
from PIL import Image

from agmm_deploy.datasets.folder import SYNTHETIC_CLASSES
from training import synthetic


def _read(path):
    return np.asarray(Image.open(path))


def _assert_sparse_inside_full(sparse, full):
    labelled = sparse != 255
    assert labelled.any()
    assert np.array_equal(sparse[labelled], full[labelled])


def test_cityscapes_layout_and_click_labels(tmp_path):
    result = synthetic.main(["--dataset", "cityscapes", "--out", str(tmp_path), "--num-train", "3",
                             "--num-val", "2", "--height", "48", "--width", "96", "--seed", "1"])
    assert result.num_train == 3
    images = sorted((tmp_path / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))
    assert len(images) == 3 and len(list((tmp_path / "leftImg8bit" / "val").glob("*/*.png"))) == 2
    for image_path in images:
        gt_name = image_path.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        full = _read(tmp_path / "gtFine" / "train" / image_path.parent.name / gt_name)
        assert _read(image_path).shape == (48, 96, 3) and full.shape == (48, 96)
        assert set(np.unique(full).tolist()) <= set(range(19)) | {255}
        counts = []
        for clicks in (20, 50, 100):
            sparse = _read(tmp_path / f"{clicks}clicks" / gt_name)
            _assert_sparse_inside_full(sparse, full)
            counts.append(int((sparse != 255).sum()))
        assert counts[0] < counts[1] < counts[2]  # more clicks, more labelled pixels


def test_voc_layout_points_and_scribbles(tmp_path):
    synthetic.generate("pascal", tmp_path, num_train=3, num_val=2, height=48, width=64, seed=0, progress=False)
    ids = (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(ids) == 3 and len((tmp_path / "ImageSets" / "Segmentation" / "val.txt").read_text().split()) == 2
    for image_id in ids:
        assert Image.open(tmp_path / "JPEGImages" / f"{image_id}.jpg").format == "JPEG"
        gt = Image.open(tmp_path / "SegmentationClass" / f"{image_id}.png")
        assert gt.mode == "P"  # indexed PNG with the VOC palette, as the real files
        full = np.asarray(gt)
        assert 255 in full  # void outlines
        point, scribble = _read(tmp_path / "point" / f"{image_id}.png"), _read(tmp_path / "scribble" / f"{image_id}.png")
        _assert_sparse_inside_full(point, full)
        _assert_sparse_inside_full(scribble, full)
        assert (scribble != 255).sum() > (point != 255).sum()
        # every class of the full label gets at least one point
        assert set(np.unique(point).tolist()) - {255} == set(np.unique(full).tolist()) - {255}


def test_folder_layout_and_same_seed_same_bytes(tmp_path):
    a = synthetic.generate("folder", tmp_path / "a", 2, 1, 32, 32, seed=3, progress=False)
    synthetic.generate("folder", tmp_path / "b", 2, 1, 32, 32, seed=3, progress=False)
    assert (a.root / "classes.txt").read_text().split() == list(SYNTHETIC_CLASSES)
    for rel in ("train/images/train_00000.png", "train/labels/train_00001.png", "val/labels/val_00000.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    synthetic.generate("folder", tmp_path / "c", 2, 1, 32, 32, seed=4, progress=False)
    assert (tmp_path / "c/train/images/train_00000.png").read_bytes() != (tmp_path / "a/train/images/train_00000.png").read_bytes()


def test_invalid_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        synthetic.generate("ade20k", tmp_path, 1, 1, 32, 32)
    with pytest.raises(ValueError, match="height, width >= 16"):
        synthetic.generate("cityscapes", tmp_path, 1, 1, 8, 32)
