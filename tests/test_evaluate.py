"""Evaluation: sliding-window tiling (each tile once), multi-scale + flip, the evaluate CLI on a checkpoint."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from agmm_deploy.checkpoint import save_checkpoint
from agmm_deploy.contract import ModelMeta
from agmm_deploy.datasets.folder import SYNTHETIC_CLASSES
from agmm_deploy.model import ModelConfig, build_model
from training import evaluate as evaluate_cli
from training import synthetic
from training.engine import center_crop, predict_multiscale, predict_sliding, sliding_window_tiles


class CountingNet(nn.Module):
    """Wraps a real network and counts the images it is run on."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.net(x)


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return build_model(ModelConfig.cityscapes(backbone="resnet18", num_classes=5)).eval()


def test_sliding_tiles_cover_the_image_once_each():
    tiles = sliding_window_tiles(100, 260, 61)
    stride = 21  # ceil(61 * (1 - 2/3))
    assert len(tiles) == len(set(tiles)) == (2 + 1) * (10 + 1)  # ceil((100-61)/21)+1 rows, ceil((260-61)/21)+1 cols
    assert all(y2 - y1 == 61 and x2 - x1 == 61 for y1, y2, x1, x2 in tiles)
    covered = np.zeros((100, 260), int)
    for y1, y2, x1, x2 in tiles:
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    assert tiles[1][2] - tiles[0][2] == stride
    assert sliding_window_tiles(40, 50, 60) == [(0, 40, 0, 50)]  # smaller than a tile: one padded window


def test_sliding_window_runs_each_tile_once_and_averages_softmax(tiny_net):
    counter = CountingNet(tiny_net)
    image = torch.randn(1, 3, 20, 28)
    probs = predict_sliding(counter, image, 5, tile=16)
    assert counter.images == len(sliding_window_tiles(20, 28, 16)) == 2 * 3  # the official loop ran each twice
    assert probs.shape == (1, 5, 20, 28)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 20, 28))
    small = predict_sliding(counter, torch.randn(1, 3, 10, 12), 5, tile=16)  # padded tile, cropped back
    assert small.shape == (1, 5, 10, 12)


def official_ms_test(net, img):
    """The official util/utils.py ms_test, with the official network's eval output (``out.softmax(1)``)."""
    model = lambda x: net(x).softmax(1)  # noqa: E731
    _, _, h, w = img.shape
    final = None
    for scale in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0):
        cur = torch.nn.functional.interpolate(img, size=(int(h * scale), int(w * scale)), mode="bilinear",
                                              align_corners=True)
        out = torch.nn.functional.interpolate(model(cur), (h, w), mode="bilinear", align_corners=True)
        final = out if final is None else final + out
        out = torch.nn.functional.interpolate(model(cur.flip(3)).flip(3), (h, w), mode="bilinear",
                                              align_corners=True)
        final += out
    return final / 14


def test_multiscale_is_fourteen_passes_averaging_softmax_as_the_official_ms_test(tiny_net):
    counter = CountingNet(tiny_net)
    image = torch.randn(1, 3, 8, 12)
    probs = predict_multiscale(counter, image)
    assert counter.images == 14 and probs.shape == (1, 5, 8, 12)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 8, 12))
    with torch.no_grad():
        torch.testing.assert_close(probs, official_ms_test(tiny_net, image), rtol=1e-4, atol=1e-6)
        plain, flipped = tiny_net(image).softmax(1), tiny_net(image.flip(3)).flip(3).softmax(1)
    single = predict_multiscale(tiny_net, image, scales=(1.0,))
    torch.testing.assert_close(single, (plain + flipped) / 2, rtol=1e-4, atol=1e-6)


def test_center_crop_takes_the_middle():
    image, label = torch.arange(2 * 10 * 12).view(2, 1, 10, 12), torch.arange(10 * 12).view(1, 10, 12)
    img, lab = center_crop(image, label, 4)
    assert img.shape[-2:] == (4, 4) and lab[0, 0, 0].item() == 3 * 12 + 4


def test_evaluate_cli_on_a_checkpoint_writes_table_pngs_and_json(tmp_path, tiny_net, capsys):
    root = tmp_path / "data"
    synthetic.generate("folder", root, num_train=1, num_val=3, height=32, width=40, seed=0, progress=False)
    torch.manual_seed(0)
    net = build_model(ModelConfig.cityscapes(backbone="resnet18", num_classes=4))
    meta = ModelMeta.for_dataset("folder", (32, 32), SYNTHETIC_CLASSES)
    ckpt = save_checkpoint(tmp_path / "model.pt", net, meta)
    result = evaluate_cli.main([str(ckpt), "--data-root", str(root), "--mode", "sliding", "--workers", "0",
                                "--save-png", str(tmp_path / "preds"), "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert result.mode == "sliding" and result.images == 3 and result.classes == SYNTHETIC_CLASSES
    assert "| disk |" in printed and f"mIoU {result.miou:.2f}" in printed
    if not torch.cuda.is_available():  # the default --amp auto / --memory-format auto, resolved and logged
        assert "precision none (fp32, no autocast), memory format contiguous on cpu" in printed
    pngs = sorted((tmp_path / "preds").glob("*.png"))
    assert [p.name for p in pngs] == ["val_00000.png", "val_00001.png", "val_00002.png"]
    png = Image.open(pngs[0])
    assert png.mode == "P" and png.size == (40, 32) and set(np.unique(np.asarray(png))) <= {0, 1, 2, 3}
    assert json.loads((tmp_path / "r.json").read_text())["miou"] == pytest.approx(result.miou)
    center = evaluate_cli.main([str(ckpt), "--data-root", str(root), "--mode", "center", "--workers", "0",
                                "--max-images", "2"])
    assert center.images == 2 and center.mode == "center"


def test_folder_data_is_evaluated_by_default_as_agmm_predict_and_the_service_segment(tmp_path, capsys):
    from agmm_deploy.inference import segment_image
    from agmm_deploy.runtime import load_runner
    from agmm_deploy.transforms import read_image

    root = tmp_path / "data"
    synthetic.generate("folder", root, num_train=1, num_val=2, height=24, width=28, seed=0, progress=False)
    torch.manual_seed(0)
    net = build_model(ModelConfig.cityscapes(backbone="resnet18", num_classes=4))
    ckpt = save_checkpoint(tmp_path / "model.pt", net, ModelMeta.for_dataset("folder", (32, 32), SYNTHETIC_CLASSES))
    result = evaluate_cli.main([str(ckpt), "--data-root", str(root), "--workers", "0", "--device", "cpu",
                                "--save-png", str(tmp_path / "preds")])
    printed = capsys.readouterr().out
    assert result.mode == "served" and "letterboxed to the input size when the image fits it" in printed
    runner = load_runner(ckpt, "cpu")
    for image in sorted((root / "val" / "images").glob("*.png")):
        served = segment_image(runner, read_image(image))  # letterboxed: 24x28 fits the 32x32 input
        evaluated = np.asarray(Image.open(tmp_path / "preds" / image.name))
        # The service resizes the uint8 image, evaluation the normalised one: rounding, not protocol.
        assert (served == evaluated).mean() > 0.98


def test_evaluate_refuses_amp_on_cpu(tmp_path):
    net = build_model(ModelConfig.cityscapes(backbone="resnet18", num_classes=4))
    ckpt = save_checkpoint(tmp_path / "m.pt", net, ModelMeta.for_dataset("folder", (32, 32), SYNTHETIC_CLASSES))
    synthetic.generate("folder", tmp_path / "d", 1, 1, 32, 32, progress=False)
    with pytest.raises(ValueError, match="--amp bf16 needs a CUDA device"):
        evaluate_cli.main([str(ckpt), "--data-root", str(tmp_path / "d"), "--amp", "bf16", "--device", "cpu"])


def test_cityscapes_predictions_go_to_the_official_evaluation_and_score_as_ours(tmp_path, capsys):
    """--png-ids official writes labelIds under names the official script matches; its mIoU equals ours."""
    from agmm_deploy.constants import CITYSCAPES_CLASSES
    from agmm_deploy.datasets.cityscapes import LABEL_IDS
    from training import cityscapes_eval

    root = tmp_path / "city"
    synthetic.generate("cityscapes", root, num_train=1, num_val=3, height=32, width=64, seed=0, progress=False)
    torch.manual_seed(0)
    net = build_model(ModelConfig.cityscapes(backbone="resnet18"))
    ckpt = save_checkpoint(tmp_path / "m.pt", net, ModelMeta.for_dataset("cityscapes", (32, 32)))
    preds = tmp_path / "preds"
    ours = evaluate_cli.main([str(ckpt), "--data-root", str(root), "--mode", "sliding", "--workers", "0",
                              "--device", "cpu", "--save-png", str(preds), "--png-ids", "official"])
    written = sorted(p.name for p in preds.iterdir())
    assert written == sorted(f"{p.name[:-len('_gtFine_labelIds.png')]}_leftImg8bit.png"
                             for p in root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    assert set(np.unique(np.asarray(Image.open(preds / written[0])))) <= set(LABEL_IDS)
    official = cityscapes_eval.main([str(preds), "--data-root", str(root)])
    assert official.images == 3 and list(official.iou) == list(CITYSCAPES_CLASSES)
    assert official.miou == pytest.approx(ours.miou, abs=1e-4)
    assert f"official mIoU {official.miou:.2f} over 3 images" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--png-ids official: PASCAL VOC has no official ids"):
        evaluate_cli.main([str(ckpt), "--data-root", str(root), "--dataset", "pascal", "--png-ids", "official"])


def test_precision_follows_training_defaults_on_the_cpu():
    cpu = torch.device("cpu")
    assert evaluate_cli.resolve_precision("auto", "auto", cpu) == evaluate_cli.EvalPrecision("none", "contiguous")
    assert evaluate_cli.resolve_precision("none", "channels_last", cpu).memory_format == "channels_last"  # kept
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
        evaluate_cli.resolve_precision("fp16", "auto", cpu)
    with pytest.raises(ValueError, match=r"got amp='fp8'.*expected amp in"):
        evaluate_cli.resolve_precision("fp8", "auto", cpu)


@pytest.mark.parametrize("bf16, expected", [(True, ("bf16", "channels_last")), (False, ("none", "channels_last"))])
def test_precision_auto_on_cuda_is_bf16_where_the_gpu_has_it(monkeypatch, bf16, expected):
    # The rule itself, on this CPU-only machine: only torch's bf16 query is answered for a GPU that is not here.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    resolved = evaluate_cli.resolve_precision("auto", "auto", torch.device("cuda"))
    assert (resolved.amp, resolved.memory_format) == expected


@pytest.mark.gpu
def test_precision_auto_on_this_gpu_matches_training():
    from training.config import resolve_for_device

    resolved = evaluate_cli.resolve_precision("auto", "auto", torch.device("cuda"))
    assert resolved.amp == ("bf16" if torch.cuda.is_bf16_supported() else "none")
    assert resolved.memory_format == "channels_last"
    assert resolve_for_device(resolved, torch.device("cuda")) == resolved  # nothing left to resolve
