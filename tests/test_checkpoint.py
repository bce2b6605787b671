import pytest
import torch

from agmm_deploy.checkpoint import CheckpointError, load_model, save_checkpoint, sha256_file
from agmm_deploy.contract import ModelMeta
from agmm_deploy.model import DeepLabV3Plus, ModelConfig

TINY = ModelConfig(backbone="resnet18", num_classes=19, multi_grid=True)


def _official_state_dict(config: ModelConfig, prefix: str = "") -> dict:
    """What the official code writes: torch.save(model.module.state_dict()), keys with or without 'module.'."""
    model = DeepLabV3Plus(config)
    for p in model.parameters():  # non-default values so a load that silently skips keys is caught
        p.data.normal_()
    return {prefix + k: v.clone() for k, v in model.state_dict().items()}


def test_save_load_rebuilds_identical_model(tmp_path):
    model = DeepLabV3Plus(TINY)
    model.train()
    model(torch.randn(2, 3, 64, 64))  # move BN running stats away from their defaults
    model.eval()
    meta = ModelMeta.for_dataset("cityscapes", (64, 64))
    path = save_checkpoint(tmp_path / "ckpt.pt", model, meta, args={"out": tmp_path, "lr": 0.01}, epoch=3)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away

    loaded = load_model(path)
    assert loaded.config == TINY
    assert loaded.meta == meta
    assert loaded.checkpoint["epoch"] == 3
    assert loaded.checkpoint["args"]["out"] == str(tmp_path)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_raw_state_dict_loads_strictly(tmp_path, prefix):
    config = ModelConfig.pascal(backbone="resnet18")
    state = _official_state_dict(config, prefix)
    path = tmp_path / "resnet18_71.00.pth"
    torch.save(state, path)
    loaded = load_model(path, backbone="resnet18", num_classes=21, dataset="pascal")
    assert loaded.config.aspp_rates == (6, 12, 18) and loaded.config.stem == "deep"
    assert loaded.meta.classes[15] == "person"
    key = "head.b1.0.weight"
    torch.testing.assert_close(loaded.model.state_dict()[key], state[prefix + key])


def test_corrupted_state_dict_names_the_keys(tmp_path):
    state = _official_state_dict(ModelConfig.cityscapes(backbone="resnet18"))
    del state["fuse.3.weight"]
    state["aux_classifier.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, backbone="resnet18", num_classes=19, dataset="cityscapes")
    message = str(err.value)
    assert "broken.pth" in message
    assert "missing keys (1): fuse.3.weight" in message
    assert "unexpected keys (1): aux_classifier.weight" in message


def test_wrong_num_classes_names_the_shapes(tmp_path):
    path = tmp_path / "city.pth"
    torch.save(_official_state_dict(ModelConfig.cityscapes(backbone="resnet18")), path)
    with pytest.raises(CheckpointError, match=r"classifier.weight \(checkpoint \(19, 256, 1, 1\), model \(21, 256"):
        load_model(path, backbone="resnet18", num_classes=21, dataset="pascal")


def test_raw_state_dict_needs_backbone_and_classes(tmp_path):
    path = tmp_path / "raw.pth"
    torch.save(_official_state_dict(TINY), path)
    with pytest.raises(CheckpointError, match="pass --backbone .* --num-classes"):
        load_model(path)


def test_truncated_and_missing_files(tmp_path):
    path = save_checkpoint(tmp_path / "ok.pt", DeepLabV3Plus(TINY), ModelMeta.for_dataset("cityscapes", (64, 64)))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt cannot be read"):
        load_model(truncated)
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        load_model(tmp_path / "missing.pt")


def test_num_classes_flag_contradicting_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "ok.pt", DeepLabV3Plus(TINY), ModelMeta.for_dataset("cityscapes", (64, 64)))
    with pytest.raises(CheckpointError, match="--num-classes 21 contradicts"):
        load_model(path, num_classes=21)
    assert len(sha256_file(path)) == 64


def test_meta_validation():
    with pytest.raises(ValueError, match="palette has 2 colours for 3 classes"):
        ModelMeta(("a", "b", "c"), ((0, 0, 0), (1, 1, 1)), (64, 64))
    meta = ModelMeta.for_dataset("folder", (32, 48), ("sky", "grass", "cow"))
    assert ModelMeta.from_dict(meta.to_dict()) == meta


def test_raw_state_dict_needs_the_official_recipe(tmp_path):
    """Both recipes have the same weight shapes: a guessed recipe would load strictly and give wrong logits."""
    path = tmp_path / "voc.pth"
    torch.save(_official_state_dict(ModelConfig.pascal(backbone="resnet18")), path)
    for dataset in (None, "folder"):
        with pytest.raises(CheckpointError, match=rf"--dataset must name the official recipe .* got {dataset!r}"):
            load_model(path, backbone="resnet18", num_classes=21, dataset=dataset)
    with pytest.raises(CheckpointError, match="--num-classes 21 does not match the 19 classes of --dataset "
                                              "cityscapes .*; a 21-class PASCAL VOC model needs --dataset pascal"):
        load_model(path, backbone="resnet18", num_classes=21, dataset="cityscapes")


def test_raw_state_dict_of_other_classes_keeps_the_recipe(tmp_path):
    config = ModelConfig.cityscapes(backbone="resnet18", num_classes=3)
    path = tmp_path / "own.pth"
    torch.save(_official_state_dict(config), path)
    with pytest.raises(CheckpointError, match="pass their names with --classes"):
        load_model(path, backbone="resnet18", num_classes=3, dataset="cityscapes")
    with pytest.raises(CheckpointError, match="2 class names were given for --num-classes 3"):
        load_model(path, backbone="resnet18", num_classes=3, dataset="cityscapes", classes=("sky", "road"))
    loaded = load_model(path, backbone="resnet18", num_classes=3, dataset="cityscapes", classes=("sky", "road", "car"))
    assert loaded.config == config  # the Cityscapes architecture: ASPP 12/24/36 and multi-grid
    assert loaded.meta.classes == ("sky", "road", "car") and loaded.meta.input_size == (721, 721)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    meta = ModelMeta.for_dataset("cityscapes", (64, 64))
    path = save_checkpoint(tmp_path / "last.pt", DeepLabV3Plus(TINY), meta, epoch=1)
    before = path.read_bytes()
    real_save = torch.save

    def crash_mid_write(obj, f):
        f.write(b"PK\x03\x04 half a zip")  # some bytes reach the disk, then the writer dies
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint(path, DeepLabV3Plus(TINY), meta, epoch=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the temporary file was removed
    assert load_model(path).checkpoint["epoch"] == 1


def test_atomic_writes_use_unique_temporary_files_and_the_umask(tmp_path):
    import os
    import threading

    from agmm_deploy.atomic import atomic_write, atomic_write_bytes

    path = tmp_path / "model.onnx"
    seen = []
    both_open = threading.Barrier(2, timeout=10)

    def slow(data):
        def write(f):
            seen.append(f.name)
            f.write(data)
            both_open.wait()  # both writers hold their temporary files at the same time
        return write

    # Two concurrent writers of the same file never share a temporary file; the last rename wins whole.
    threads = [threading.Thread(target=atomic_write, args=(path, slow(bytes([i]) * 1000))) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 2 and path.read_bytes() in (b"\x00" * 1000, b"\x01" * 1000)
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_bytes(path, b"x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("key,value,count", [
    ("backbone.conv1.0.weight", float("nan"), "1 NaN and 0 Inf"),  # one NaN in the first conv
    ("classifier.weight", float("nan"), "NaN and 0 Inf"),  # the whole classifier NaN
    ("backbone.conv1.1.running_var", float("nan"), "1 NaN"),  # a BatchNorm statistic, not a parameter
    ("head.b1.0.weight", float("inf"), "0 NaN and 1 Inf"),  # one Inf
])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, key, value, count):
    model = DeepLabV3Plus(TINY).eval()
    tensor = model.state_dict()[key]
    if key == "classifier.weight":
        tensor.fill_(value)
    else:
        tensor.view(-1)[0] = value
    path = save_checkpoint(tmp_path / "ckpt.pt", model, ModelMeta.for_dataset("cityscapes", (64, 64)))
    with pytest.raises(CheckpointError, match=rf"ckpt.pt holds non-finite weights: {key} has .*{count}"):
        load_model(path)


def test_raw_state_dict_with_nan_is_refused(tmp_path):
    state = _official_state_dict(ModelConfig.pascal(backbone="resnet18"))
    state["backbone.layer1.0.bn1.running_var"][3] = float("nan")
    torch.save(state, tmp_path / "raw.pth")
    with pytest.raises(CheckpointError, match="backbone.layer1.0.bn1.running_var has 1 NaN"):
        load_model(tmp_path / "raw.pth", backbone="resnet18", num_classes=21, dataset="pascal")
