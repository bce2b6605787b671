"""Data sets: layouts and split files of each format, label checks naming the file (at start-up and per item),
the official training transform."""

import shutil
import numpy as np
import pytest
import torch
from PIL import Image

from agmm_deploy.constants import IMAGENET_MEAN, IMAGENET_STD
from training import synthetic
from agmm_deploy.datasets import DataError, Sample, cityscapes, folder, get_format, pascal
from torch.utils.data import DataLoader

from training.data import (MAX_DEFAULT_WORKERS, SegmentationDataset, check_labels, default_workers,
                           read_label)

cityscapes_samples, voc_samples, folder_samples = cityscapes.samples, pascal.samples, folder.samples


def train_samples(name, root, **options):
    return get_format(name).train_samples(root, options)


def val_samples(name, root, val_list=None):
    return get_format(name).val_samples(root, {"val_list": val_list})


@pytest.fixture(scope="module")
def city_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("city")
    synthetic.generate("cityscapes", root, num_train=4, num_val=2, height=48, width=96, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    synthetic.generate("pascal", root, num_train=3, num_val=2, height=40, width=56, seed=0, progress=False)
    return root


def test_cityscapes_splits_and_click_folders(city_root, tmp_path):
    train = cityscapes_samples(city_root, "train", clicks=50)
    assert len(train) == 4
    assert all(s.label.parent.name == "50clicks" and s.label.name.endswith("_gtFine_labelTrainIds.png") for s in train)
    val = val_samples("cityscapes", city_root)
    assert len(val) == 2 and all(s.label.parent.parent.name == "val" for s in val)
    # the official split-file format: "<leftImg8bit path> <gtFine path>" relative to the root
    rows = [f"{s.image.relative_to(city_root)} gtFine/train/{s.image.parent.name}/{s.label.name}" for s in train[:2]]
    (tmp_path / "train.txt").write_text("\n".join(rows) + "\n")
    listed = train_samples("cityscapes", city_root, clicks=20, train_list=tmp_path / "train.txt")
    assert [s.image for s in listed] == [s.image for s in train[:2]]
    assert all(s.label.parent.name == "20clicks" for s in listed)


def test_voc_ids_and_official_list_format(voc_root, tmp_path):
    point = voc_samples(voc_root, "train", label="point")
    scribble = voc_samples(voc_root, "train", label="scribble")
    assert len(point) == len(scribble) == 3
    assert point[0].label.parent.name == "point" and scribble[0].label.parent.name == "scribble"
    ids = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()
    (tmp_path / "val.txt").write_text("".join(f"{i}.jpg {i}.png\n" for i in ids))
    assert val_samples("pascal", voc_root, tmp_path / "val.txt") == val_samples("pascal", voc_root)


def test_a_voc_root_without_train_aug_is_refused_with_the_count_of_train_txt(voc_root, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(voc_root, root)
    (root / "ImageSets/Segmentation/train_aug.txt").unlink()
    with pytest.raises(DataError, match=r"train_aug.txt does not exist: the paper trains on the 10,582-image .*"
                                        r"/train.txt lists 3 images \(stock VOC 2012: 1,464\).* pass --train-list "):
        train_samples("pascal", root)
    assert len(train_samples("pascal", root, train_list=root / "ImageSets/Segmentation/train.txt")) == 3


def test_bad_data_root_and_missing_files_are_named(city_root, tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        train_samples("cityscapes", tmp_path / "nowhere", clicks=20)
    with pytest.raises(DataError, match="leftImg8bit"):
        train_samples("cityscapes", tmp_path, clicks=20)
    with pytest.raises(DataError, match="JPEGImages"):
        train_samples("pascal", tmp_path)
    with pytest.raises(DataError, match="classes.txt"):
        folder.read_classes(tmp_path)
    (tmp_path / "list.txt").write_text("leftImg8bit/train/x/missing_leftImg8bit.png gtFine/train/x/missing.png\n")
    with pytest.raises(DataError, match="missing_leftImg8bit.png"):
        cityscapes_samples(city_root, "train", list_file=tmp_path / "list.txt")
    (tmp_path / "bad.txt").write_text("a b c\n")
    with pytest.raises(DataError, match="line 1 has 3 fields"):
        cityscapes_samples(city_root, "train", list_file=tmp_path / "bad.txt")


def _write_pair(folder, name, image, label):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{name}.png")
    Image.fromarray(label).save(folder / "labels" / f"{name}.png")


def test_label_values_outside_classes_fail_naming_the_file(tmp_path):
    label = np.full((16, 16), 255, np.uint8)
    label[3, 3] = 4  # K = 4 means "unlabelled": allowed
    label[5, 5] = 7  # not a class of a 4-class data set
    _write_pair(tmp_path / "train", "img0", np.zeros((16, 16, 3), np.uint8), label)
    dataset = SegmentationDataset(folder_samples(tmp_path, "train"), num_classes=4, train=True, crop_size=8)
    with pytest.raises(DataError, match=r"img0\.png holds values \[7\] outside 0\.\.3"):
        dataset[0]


def test_negative_values_of_an_int32_label_are_refused_not_wrapped_to_255(tmp_path):
    label = np.full((16, 16), 4, np.int32)
    label[2, 2] = -1  # would become 255 (ignore) through astype(uint8) if not refused
    label[6, 6] = 1
    _write_pair(tmp_path / "train", "img0", np.zeros((16, 16, 3), np.uint8), label.astype(np.uint8))
    path = tmp_path / "train" / "labels" / "img0.png"
    Image.fromarray(label).save(path, format="TIFF")  # PNG cannot hold mode I; PIL reads files by content
    assert Image.open(path).mode == "I"
    with pytest.raises(DataError, match=r"img0\.png holds values \[-1\] outside 0\.\.3"):
        read_label(path, num_classes=4)


def test_rgb_label_and_size_mismatch_are_refused(tmp_path):
    _write_pair(tmp_path / "train", "rgb", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    _write_pair(tmp_path / "train", "small", np.zeros((8, 8, 3), np.uint8), np.zeros((6, 8), np.uint8))
    dataset = SegmentationDataset(folder_samples(tmp_path, "train"), num_classes=3, train=False)
    with pytest.raises(DataError, match="rgb.png has mode RGB"):
        dataset[0]
    with pytest.raises(DataError, match="small.png is 8x6"):
        dataset[1]


def test_training_item_unlabelled_to_k_padding_255_cls_label_before_crop(tmp_path):
    k = 4
    label = np.full((16, 16), 255, np.uint8)  # unlabelled written as 255 in the file
    label[0, 0] = 2  # class 2 clicked in one corner only
    label[15, 15] = 1
    label[8, 8] = k  # unlabelled written as K is accepted too
    image = np.full((16, 16, 3), 200, np.uint8)
    _write_pair(tmp_path / "train", "a", image, label)
    # crop 40 > twice the image: every crop is padded on the bottom/right
    dataset = SegmentationDataset(folder_samples(tmp_path, "train"), num_classes=k, train=True, crop_size=40, seed=5)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        img, mask, cls_label, index = dataset[0]
        assert img.shape == (3, 40, 40) and img.dtype == torch.float32 and mask.shape == (40, 40)
        assert mask.dtype == torch.uint8  # int64 only on the device
        assert index == 0
        assert cls_label.tolist() == [0.0, 1.0, 1.0, 0.0]  # from the whole label, whatever the crop holds
        values = set(mask.unique().tolist())
        assert values <= {1, 2, k, 255} and k in values and 255 in values
        padding = mask == 255
        zero = (torch.zeros(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        assert torch.allclose(img[:, padding].T, zero.expand(int(padding.sum()), 3), atol=1e-6)  # image pad 0
        inside = ~padding
        assert torch.allclose(img[:, inside].T.mean(0), (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD), atol=1e-3)


def test_augmentation_depends_on_seed_epoch_index_only(voc_root):
    samples = voc_samples(voc_root, "train", label="scribble")
    plain = SegmentationDataset(samples, 21, train=True, crop_size=32, colour_aug=False, seed=1)
    coloured = SegmentationDataset(samples, 21, train=True, crop_size=32, colour_aug=True, seed=1)
    again = SegmentationDataset(samples, 21, train=True, crop_size=32, colour_aug=True, seed=1)
    for dataset in (plain, coloured, again):
        dataset.set_epoch(3)
    a, b, c = plain[1], coloured[1], again[1]
    assert torch.equal(b[0], c[0]) and torch.equal(b[1], c[1])  # same (seed, epoch, index): same sample
    assert torch.equal(a[1], b[1])  # colour augmentation leaves the geometry (and label) alone
    assert any(not torch.equal(plain[i][0], coloured[i][0]) for i in range(3))  # but changes the pixels
    again.set_epoch(4)
    assert not torch.equal(again[1][1], c[1])  # another epoch, another crop


def test_validation_item_is_the_whole_image_with_its_full_label(voc_root):
    samples = val_samples("pascal", voc_root)
    dataset = SegmentationDataset(samples, 21, train=False)
    img, mask, index = dataset[1]
    full = np.asarray(Image.open(samples[1].label))
    assert img.shape == (3, 40, 56) and mask.dtype == torch.uint8 and torch.equal(mask, torch.from_numpy(full.copy()))
    assert 255 in mask  # void stays void in full labels


def test_check_labels_reads_every_file_at_start_up(tmp_path):
    label = np.full((16, 16), 255, np.uint8)
    label[3, 3] = 2
    _write_pair(tmp_path / "train", "good", np.zeros((16, 16, 3), np.uint8), label)
    samples = folder_samples(tmp_path, "train")
    assert check_labels(samples, num_classes=4, what="training labels") == 1
    _write_pair(tmp_path / "train", "rgb", np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DataError, match="rgb.png has mode RGB"):
        check_labels(folder_samples(tmp_path, "train"), num_classes=4, what="training labels")
    (tmp_path / "train" / "labels" / "rgb.png").unlink()
    bad = label.copy()
    bad[0, 0] = 9
    _write_pair(tmp_path / "train", "rgb", np.zeros((16, 16, 3), np.uint8), bad)
    with pytest.raises(DataError, match=r"rgb\.png holds values \[9\] outside 0\.\.3"):
        check_labels(folder_samples(tmp_path, "train"), num_classes=4, what="training labels")
    _write_pair(tmp_path / "train", "rgb", np.zeros((16, 20, 3), np.uint8), label)
    with pytest.raises(DataError, match="is 20x16 but label .* is 16x16"):
        check_labels(folder_samples(tmp_path, "train"), num_classes=4, what="training labels")


def test_check_labels_refuses_a_set_without_a_labelled_pixel(tmp_path):
    empty = np.full((8, 8), 255, np.uint8)
    empty[0, :4] = 4  # K: unlabelled too
    _write_pair(tmp_path / "train", "a", np.zeros((8, 8, 3), np.uint8), empty)
    with pytest.raises(DataError, match="none of the 1 training labels holds a labelled pixel"):
        check_labels(folder_samples(tmp_path, "train"), num_classes=4, what="training labels")
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="x.png cannot be read as an image"):
        check_labels([Sample(tmp_path / "x.png", tmp_path / "train" / "labels" / "a.png")], 4, "labels")


def test_persistent_workers_see_each_epoch_set_after_they_started(city_root):
    # Persistent workers hold a copy of the dataset made at their start; the epoch must still reach them, or every
    # epoch after the first would repeat the first one's crops (and a resumed run would differ from a straight one).
    dataset = SegmentationDataset(train_samples("cityscapes", city_root, clicks=20), 19, train=True, crop_size=32)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in (0, 1, 2):
        dataset.set_epoch(epoch)
        images = torch.cat([batch[0] for batch in loader])
        expected = torch.stack([dataset[i][0] for i in range(len(dataset))])  # in this process, same epoch
        torch.testing.assert_close(images, expected, rtol=0, atol=0, msg=f"epoch {epoch}")
    assert not torch.equal(images, torch.stack([SegmentationDataset(dataset.samples, 19, train=True,
                                                                    crop_size=32)[i][0] for i in range(4)]))


def test_default_workers_share_the_cores_among_the_node_processes():
    assert default_workers(1, cores=16) == 15  # one GPU: every core but the training process's own
    assert default_workers(8, cores=64) == 7  # eight GPUs share the node
    assert default_workers(1, cores=128) == MAX_DEFAULT_WORKERS
    assert default_workers(4, cores=2) == 1 and default_workers(1, cores=1) == 1  # never 0: decoding off the step
