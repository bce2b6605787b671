import numpy as np
import pytest
import torch
from PIL import Image

from agmm_deploy.checkpoint import save_checkpoint
from agmm_deploy.cli.predict import main
from agmm_deploy.export.onnx import export_onnx
from agmm_deploy.contract import ModelMeta
from agmm_deploy.model import DeepLabV3Plus, ModelConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("predict")
    model = DeepLabV3Plus(ModelConfig(backbone="resnet18", num_classes=21)).eval()
    meta = ModelMeta.for_dataset("pascal", (64, 64))
    ckpt = save_checkpoint(folder / "voc.pt", model, meta)
    onnx_path = export_onnx(model, meta, folder / "model.onnx", height=64, width=64).path
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(images / "small.jpg")
    Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(images / "large.png")
    Image.fromarray(rng.integers(0, 255, (30, 200), dtype=np.uint8), mode="L").save(images / "gray_wide.png")
    return ckpt, onnx_path, images


@pytest.mark.parametrize("which", ["checkpoint", "onnx"])
def test_writes_palette_labels_and_overlays_at_the_image_size(setup, tmp_path, capsys, which):
    ckpt, onnx_path, images = setup
    model = ckpt if which == "checkpoint" else onnx_path
    assert main([str(model), str(images), "--out", str(tmp_path), "--overlay", "--no-progress"]) == 0
    assert "3 image(s): 3 written, 0 already complete" in capsys.readouterr().out
    for stem, size in [("small", (50, 40)), ("large", (130, 90)), ("gray_wide", (200, 30))]:
        label = Image.open(tmp_path / f"{stem}.png")
        assert label.mode == "P" and label.size == size
        assert label.getpalette()[:6] == [0, 0, 0, 128, 0, 0]  # VOC background, aeroplane
        assert np.asarray(label).max() < 21
        overlay = Image.open(tmp_path / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == size


def test_overlays_only_when_asked(setup, tmp_path):
    _, onnx_path, images = setup
    assert main([str(onnx_path), str(images / "small.jpg"), "--out", str(tmp_path), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.parquet", "small.png"]


def test_checkpoint_and_onnx_predict_the_same_labels(setup, tmp_path):
    ckpt, onnx_path, images = setup
    assert main([str(ckpt), str(images / "large.png"), "--out", str(tmp_path / "a"), "--device", "cpu"]) == 0
    assert main([str(onnx_path), str(images / "large.png"), "--out", str(tmp_path / "b"), "--device", "cpu"]) == 0
    a = np.asarray(Image.open(tmp_path / "a" / "large.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "large.png"))
    assert (a == b).mean() > 0.999


def test_bad_inputs(setup, tmp_path, capsys):
    _, onnx_path, images = setup
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert main([str(onnx_path), str(images / "small.jpg"), str(broken), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "not written" in err and "broken.jpg could not be decoded" in err
    assert (tmp_path / "o" / "small.png").is_file() and not (tmp_path / "o" / "broken.png").exists()
    assert main([str(tmp_path / "nope.onnx"), str(images), "--out", str(tmp_path)]) == 2
    assert "nope.onnx does not exist" in capsys.readouterr().err
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "small.png").write_bytes((images / "large.png").read_bytes())
    assert main([str(onnx_path), str(images / "small.jpg"), str(twin / "small.png"), "--out", str(tmp_path / "t")]) == 2
    assert "would write the same output file" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # refused before writing anything


def test_raw_state_dict_needs_the_recipe_and_takes_class_names(tmp_path, capsys):
    torch.manual_seed(0)
    config = ModelConfig.cityscapes(backbone="resnet18", num_classes=3)
    raw = tmp_path / "own.pth"
    torch.save(DeepLabV3Plus(config).state_dict(), raw)
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 200, 3), dtype=np.uint8)).save(image)
    argv = [str(raw), str(image), "--backbone", "resnet18", "--num-classes", "3"]
    assert main(argv + ["--out", str(tmp_path / "no")]) == 2
    assert "--dataset must name the official recipe it was trained with" in capsys.readouterr().err
    assert main(argv + ["--dataset", "cityscapes", "--classes", "sky,road,car", "--out", str(tmp_path / "o"),
                        "--device", "cpu"]) == 0
    # The same labels as the library call with the same flags (input 721x721, the recipe crop: letterboxed).
    from agmm_deploy.inference import segment_image
    from agmm_deploy.runtime import load_runner
    from agmm_deploy.transforms import read_image

    runner = load_runner(raw, "cpu", backbone="resnet18", num_classes=3, dataset="cityscapes",
                         classes=("sky", "road", "car"))
    assert runner.meta.classes == ("sky", "road", "car") and runner.model.config == config
    expected = segment_image(runner, read_image(image))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "wide.png")), expected)
