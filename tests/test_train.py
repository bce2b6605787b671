"""The training recipe end to end on tiny synthetic data: outputs, LR schedule, config precedence,
kill + --resume, a real 2-process gloo torchrun run, and clear failures on bad data."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from agmm_deploy.checkpoint import load_model, read_checkpoint
from agmm_deploy.datasets import DataError, get_format
from agmm_deploy.datasets.folder import SYNTHETIC_CLASSES
from training import run, synthetic
from training.config import ConfigError, resolve_config, resolve_for_device
from training.engine import poly_factor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def city_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("city")
    synthetic.generate("cityscapes", root, num_train=8, num_val=2, height=48, width=96, seed=0, progress=False)
    return root


def tiny_args(root, out, *extra):
    return ["--dataset", "cityscapes", "--clicks", "20", "--data-root", str(root), "--out", str(out),
            "--pretrained", "none", "--backbone", "resnet18", "--crop-size", "32", "--batch-size", "2", "--workers",
            "0", "--device", "cpu", "--max-val-images", "1", "--eval-mode", "center", "--log-every", "1", *extra]


def metrics_by_step(out):
    """Step -> logged record; each step appears once, also after a resume (the repeated steps replace theirs)."""
    records = {}
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["step"] not in records, f"step {record['step']} logged twice"
        records[record["step"]] = record
    return records


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_tiny_run_writes_self_describing_checkpoints_logs_and_poly_lr(city_root, tmp_path):
    out = tmp_path / "run"
    result = run.main(tiny_args(city_root, out, "--epochs", "2", "--lr", "0.01"))
    assert result.step == 8 and result.epoch == 1  # 8 images / batch 2 = 4 steps per epoch
    for name in ("last.pt", "best.pt", "config.yaml", "train.log", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = read_checkpoint(out / "last.pt")
    for key in ("model", "model_config", "meta", "optimizer", "scheduler", "scaler", "epoch", "step", "best_miou",
                "args"):
        assert key in ckpt, key
    assert ckpt["step"] == 8 and ckpt["epoch"] == 1 and ckpt["args"]["lr"] == 0.01
    # the CPU default is the exact fp32 path, and the checkpoint says what ran, not "auto"
    assert ckpt["args"]["amp"] == "none" and ckpt["args"]["memory_format"] == "contiguous"
    assert ckpt["meta"]["input_size"] == [32, 32] and ckpt["meta"]["classes"][0] == "road"
    assert ckpt["model_config"]["backbone"] == "resnet18" and ckpt["model_config"]["num_classes"] == 19
    loaded = load_model(out / "best.pt")  # rebuilt from the file alone
    assert loaded.meta.mean == pytest.approx((0.485, 0.456, 0.406))
    with torch.no_grad():
        assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 19, 32, 32)
    records = metrics_by_step(out)
    assert sorted(records) == list(range(1, 9))
    for step, record in records.items():  # poly LR from the global step: lr(s) = base (1 - s/total)^0.9
        assert record["lr"] == pytest.approx(0.01 * poly_factor(step - 1, 8))
        assert set(record) >= {"seg", "cls", "proto", "gmm", "total"}
        assert record["total"] == pytest.approx(record["seg"] + record["cls"] + record["proto"] + record["gmm"], rel=1e-5)
    log = (out / "train.log").read_text()
    assert "validation, mode center (the central crop only" in log and log.count("mIoU ") >= 2
    assert log.count("| **mIoU** |") == 1  # two evaluations, the per-class table with the last only (--table-every)
    assert "finished at step 8" in log
    assert "precision none (fp32, no autocast), memory format contiguous; the loss runs in fp32" in log
    assert "0 data loader worker(s) per process\n" in log
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["total_steps"] == 8 and resolved["head_lr_mult"] == 1.0 and resolved["colour_aug"] is False
    assert resolved["amp"] == "none" and resolved["memory_format"] == "contiguous" and resolved["workers"] == 0


def test_config_file_then_flags_and_partial_ce(city_root, tmp_path):
    config = tmp_path / "cfg.yaml"
    # official key names (lr_multi) are read as ours
    config.write_text("epochs: 1\nlr: 0.02\nlr_multi: 3.0\nbatch_size: 2\nloss: ce\nbackbone: resnet34\n")
    out = tmp_path / "run"
    run.main(tiny_args(city_root, out, "--config", str(config), "--lr", "0.005", "--max-steps", "2"))
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lr"] == 0.005 and resolved["head_lr_mult"] == 3.0 and resolved["epochs"] == 1
    assert resolved["backbone"] == "resnet18"  # the flag wins over the file
    assert resolved["loss"] == "ce" and resolved["total_steps"] == 2
    records = metrics_by_step(out)
    assert set(records[1]) == {"step", "epoch", "lr", "seg", "total"}  # partial CE logs its one term
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown setting 'learning_rate'"):
        run.main(tiny_args(city_root, tmp_path / "x", "--config", str(bad)))


def test_kill_and_resume_reproduce_the_uninterrupted_run(city_root, tmp_path):
    def command(out, *extra):
        return [sys.executable, "-m", "training.run", *tiny_args(city_root, out, "--epochs", "2", *extra)]

    straight = tmp_path / "straight"
    subprocess.run(command(straight), env=_env(), check=True, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "last.pt").is_file():  # written atomically at the end of epoch 0
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.kill()
    assert proc.wait() == -9  # killed mid-run, not finished
    killed_at = read_checkpoint(out / "last.pt")["step"]
    assert killed_at == 4  # end of epoch 0; the kill came during epoch 1

    resumed = subprocess.run(command(out, "--resume", "auto"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / 'last.pt'}" in resumed.stdout
    expected, got = metrics_by_step(straight), metrics_by_step(out)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    next_step = killed_at + 1  # the first step the resumed process ran
    for key in ("total", "seg", "cls", "proto", "gmm", "lr"):
        assert got[next_step][key] == pytest.approx(expected[next_step][key], rel=1e-6, abs=1e-7), key
    for step in range(next_step, 9):
        assert got[step]["total"] == pytest.approx(expected[step]["total"], rel=1e-5)
    a, b = read_checkpoint(straight / "last.pt"), read_checkpoint(out / "last.pt")
    assert a["step"] == b["step"] == 8
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_torchrun_two_gloo_processes_finish_with_identical_weights(city_root, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "training.run", *tiny_args(city_root, out, "--epochs", "2", "--max-steps", "3")]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "parameters identical on all 2 ranks: True" in (out / "train.log").read_text()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["world_size"] == 2 and resolved["steps_per_epoch"] == 2  # 8 images / (2 ranks x batch 2)
    assert read_checkpoint(out / "last.pt")["step"] == 3
    assert sorted(metrics_by_step(out)) == [1, 2, 3]  # rank 0 alone writes
    log = (out / "train.log").read_text()
    assert log.count("BatchNorm statistics per process (cpu has no SyncBatchNorm") == 1
    assert log.count("epoch 0 done") == 1 and log.count("epoch 0 validation") == 1  # one log, written once
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl",
                                                     "tensorboard", "train.log"]  # no second writer's files
    assert len(list((out / "tensorboard").iterdir())) == 1


def test_sync_batchnorm_only_for_several_cuda_processes():
    from agmm_deploy.model import ModelConfig, build_model

    def kinds(net):
        return {type(m).__name__ for m in net.modules() if "BatchNorm" in type(m).__name__}

    config = ModelConfig.cityscapes(backbone="resnet18")
    assert kinds(run.sync_batchnorm(build_model(config), torch.device("cuda", 0), 2)) == {"SyncBatchNorm"}
    assert kinds(run.sync_batchnorm(build_model(config), torch.device("cuda", 0), 1)) == {"BatchNorm2d"}
    assert kinds(run.sync_batchnorm(build_model(config), torch.device("cpu"), 2)) == {"BatchNorm2d"}  # gloo


def test_bad_data_root_and_bad_label_values_name_the_path(city_root, tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        run.main(tiny_args(tmp_path / "missing", tmp_path / "a", "--epochs", "1"))
    broken = tmp_path / "broken"
    shutil.copytree(city_root, broken)
    victim = sorted((broken / "20clicks").glob("*.png"))[2]
    label = np.asarray(Image.open(victim)).copy()
    label[0, :5] = 40  # not a Cityscapes train id
    Image.fromarray(label).save(victim)
    with pytest.raises(DataError, match=rf"{victim.name} holds values \[40\]"):
        run.main(tiny_args(broken, tmp_path / "b", "--epochs", "1"))


def test_refusals_are_explicit(city_root, tmp_path):
    with pytest.raises(ValueError, match="--amp bf16 needs a CUDA device"):
        run.main(tiny_args(city_root, tmp_path / "a", "--amp", "bf16"))
    with pytest.raises(ValueError, match="--batch-size 1 cannot train BatchNorm"):
        run.main(tiny_args(city_root, tmp_path / "b", "--batch-size", "1"))
    with pytest.raises(ValueError, match=r"8 training images cannot fill one batch of 16 x 1 process\(es\); lower "
                                         r"--batch-size to 8 or less, or add images"):
        run.main(tiny_args(city_root, tmp_path / "c", "--batch-size", "16"))


def test_workers_above_the_cores_are_clamped_with_one_log_line(monkeypatch):
    lines = []
    logger = type("Logger", (), {"info": lambda self, message: lines.append(message)})()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert run._workers_within_cores(2, logger) == 2 and lines == []
    assert run._workers_within_cores(4, logger) == 2
    assert lines == ["--workers 4 is more than the 2 CPU core(s) this process may use: running 2 data loader workers"]


@pytest.mark.parametrize("name", ["cityscapes", "pascal"])
def test_shipped_configs_reproduce_the_presets(name):
    config = REPO / "training" / "configs" / f"{name}.yaml"
    resolved = resolve_config({"data_root": "x", "pretrained": "none"}, config).to_dict()
    row = get_format(name)
    preset = {**row.model, **row.recipe}
    for key in ("backbone", "crop_size", "epochs", "batch_size", "lr", "head_lr_mult", "colour_aug", "multi_grid"):
        assert resolved[key] == preset[key], key
    assert tuple(resolved["aspp_rates"]) == preset["aspp_rates"]


# The official configs/pascal.yaml and configs/cityscapes.yaml of the AGMM code, key for key.
OFFICIAL_PASCAL = """dataset: pascal
nclass: 21
crop_size: 321
aug: True
data_root: Pascal
mode: 'point'
epochs: 80
batch_size: 16
lr: 0.001
lr_multi: 10.0
criterion:
  name: CELoss
  kwargs:
    ignore_index: 255
conf_thresh: 0.95
aux: False
backbone: resnet101
multi_grid: False
replace_stride_with_dilation: [False, True, True]
dilations: [6, 12, 18]
"""
OFFICIAL_CITYSCAPES = """dataset: cityscapes
nclass: 19
crop_size: 721
aug: False
data_root: Cityscapes
mode: 'point'
epochs: 240
batch_size: 4
lr: 0.005
lr_multi: 1.0
criterion:
  name: CELoss
  use_class_weight: False
  kwargs:
    ignore_index: 255
conf_thresh: 0.95
weight: 0.5
aux: False
backbone: resnet50
multi_grid: True
replace_stride_with_dilation: [False, True, True]
dilations: [12, 24, 36]
"""


def _resolve(tmp_path, text, **flags):
    path = tmp_path / "official.yaml"
    path.write_text(text)
    return resolve_config({"pretrained": "none", **flags}, path).to_dict()


def test_official_configs_map_mode_dilation_and_accept_celoss(tmp_path):
    voc = _resolve(tmp_path, OFFICIAL_PASCAL)
    assert voc["label"] == "point" and voc["output_stride"] == 8 and voc["aspp_rates"] == [6, 12, 18]
    assert voc["head_lr_mult"] == 10.0 and voc["colour_aug"] is True and voc["data_root"] == "Pascal"
    assert _resolve(tmp_path, OFFICIAL_PASCAL.replace("'point'", "'scribble'"))["label"] == "scribble"
    # flags win over the file, as for every other setting
    assert _resolve(tmp_path, OFFICIAL_PASCAL, label="scribble")["label"] == "scribble"
    city = _resolve(tmp_path, OFFICIAL_CITYSCAPES)
    assert city["clicks"] == 100 and city["multi_grid"] is True  # official 'point' reads 100clicks/
    assert _resolve(tmp_path, OFFICIAL_CITYSCAPES.replace("'point'", "20clicks"))["clicks"] == 20
    stride16 = OFFICIAL_CITYSCAPES.replace("[False, True, True]", "[False, False, True]")
    assert _resolve(tmp_path, stride16)["output_stride"] == 16


@pytest.mark.parametrize("text, message", [
    (OFFICIAL_PASCAL.replace("'point'", "'full'"), r"mode: 'full' cannot be mapped for dataset pascal; "
                                                   r"expected 'point' or 'scribble'"),
    (OFFICIAL_CITYSCAPES.replace("'point'", "random_50clicks"), r"mode: 'random_50clicks' cannot be mapped for "
                                                               r"dataset cityscapes"),
    (OFFICIAL_CITYSCAPES.replace("'point'", "30clicks"), r"mode: '30clicks' cannot be mapped"),
    (OFFICIAL_CITYSCAPES.replace("CELoss", "OHEM"), r"criterion: \{'name': 'OHEM'.* is not implemented"),
    (OFFICIAL_CITYSCAPES.replace("use_class_weight: False", "use_class_weight: True"), r"criterion: .*not implemented"),
    (OFFICIAL_PASCAL.replace("ignore_index: 255", "thresh: 0.7"), r"criterion: .*'thresh'.* is not implemented"),
    (OFFICIAL_PASCAL.replace("nclass: 21", "nclass: 20"), r"nclass: 20 does not match dataset pascal \(21 classes\)"),
    (OFFICIAL_PASCAL.replace("aux: False", "aux: True"), r"aux: True: the auxiliary head is not implemented"),
    (OFFICIAL_PASCAL.replace("[False, True, True]", "[True, True, True]"), r"replace_stride_with_dilation: .* cannot"),
    (OFFICIAL_PASCAL + "label: scribble\n", r"mode: 'point' means label='point', but the file also sets label"),
])
def test_official_keys_that_cannot_be_mapped_raise_naming_key_and_file(tmp_path, text, message):
    with pytest.raises(ValueError, match=r"--config .*official\.yaml: " + message):
        _resolve(tmp_path, text)


def test_evaluate_refuses_validation_labels_without_a_labelled_pixel(tmp_path):
    from agmm_deploy.checkpoint import save_checkpoint
    from agmm_deploy.contract import ModelMeta
    from agmm_deploy.model import ModelConfig, build_model
    from training import evaluate as evaluate_cli

    root = tmp_path / "data"
    synthetic.generate("folder", root, num_train=1, num_val=1, height=32, width=32, seed=0, progress=False)
    for label in (root / "val" / "labels").glob("*.png"):
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(label)  # all "ignore": no IoU can exist
    torch.manual_seed(0)
    net = build_model(ModelConfig.cityscapes(backbone="resnet18", num_classes=len(SYNTHETIC_CLASSES)))
    ckpt = save_checkpoint(tmp_path / "m.pt", net, ModelMeta.for_dataset("folder", (32, 32), SYNTHETIC_CLASSES))
    with pytest.raises(ValueError, match=r"hold no labelled pixel .* so there is no mIoU"):
        evaluate_cli.main([str(ckpt), "--data-root", str(root), "--mode", "whole", "--workers", "0", "--device",
                           "cpu", "--json", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_device_defaults_bf16_channels_last_on_cuda_exact_fp32_on_cpu(city_root, tmp_path, monkeypatch):
    cfg = resolve_config({"dataset": "cityscapes", "data_root": str(city_root), "pretrained": "none"})
    assert (cfg.amp, cfg.memory_format) == ("auto", "auto")
    cpu = resolve_for_device(cfg, torch.device("cpu"))
    assert (cpu.amp, cpu.memory_format) == ("none", "contiguous")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    fast = resolve_for_device(cfg, cuda)
    assert (fast.amp, fast.memory_format) == ("bf16", "channels_last")
    exact = resolve_for_device(dataclasses.replace(cfg, amp="none", memory_format="contiguous"), cuda)
    assert (exact.amp, exact.memory_format) == ("none", "contiguous")  # the flags keep the exact fp32 path
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_for_device(cfg, cuda).amp == "none"  # no bf16 on this GPU: fp32, never a quiet fp16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(ConfigError, match="--amp bf16: Tesla V100 does not support bfloat16"):
        resolve_for_device(dataclasses.replace(cfg, amp="bf16"), cuda)
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA device"):
        resolve_for_device(dataclasses.replace(cfg, amp="fp16"), torch.device("cpu"))


@pytest.mark.gpu
def test_cuda_defaults_run_bf16_channels_last(city_root, tmp_path):
    tiny = [a if a != "cpu" else "cuda" for a in tiny_args(city_root, tmp_path / "gpu", "--max-steps", "2",
                                                          "--epochs", "1")]
    run.main(tiny)
    args = read_checkpoint(tmp_path / "gpu" / "last.pt")["args"]
    expected = "bf16" if torch.cuda.is_bf16_supported() else "none"
    assert args["amp"] == expected and args["memory_format"] == "channels_last"
    assert f"precision {expected} (" in (tmp_path / "gpu" / "train.log").read_text()


@pytest.mark.gpu
def test_cuda_bf16_run(city_root, tmp_path):
    tiny = [a if a != "cpu" else "cuda" for a in tiny_args(city_root, tmp_path / "gpu", "--max-steps", "2",
                                                          "--epochs", "1", "--amp", "bf16")]
    result = run.main(tiny)
    assert result.step == 2 and read_checkpoint(tmp_path / "gpu" / "last.pt")["args"]["amp"] == "bf16"


@pytest.mark.parametrize("flags, message", [
    (dict(dataset="pascal", clicks=20), r"--clicks is not used by --dataset pascal \(its data-set flags: --label, "
                                        r"--train-list, --val-list\); remove it"),
    (dict(dataset="cityscapes", label="scribble"), r"--label is not used by --dataset cityscapes"),
    (dict(dataset="folder", train_list="x.txt"), r"--train-list is not used by --dataset folder \(its data-set "
                                                 r"flags: none of them\)"),
])
def test_flags_of_other_data_formats_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({"data_root": "x", **flags})


@pytest.mark.parametrize("dataset, weights", [("cityscapes", "resnet50.pth"), ("pascal", "resnet101.pth")])
def test_the_paper_data_sets_refuse_to_train_from_random_weights_unless_told(dataset, weights):
    with pytest.raises(ConfigError, match=rf"--dataset {dataset} needs --pretrained: the official code always "
                                          rf"starts from ImageNet-pretrained .*Luffy03/AGMM-SASS.* Pass --pretrained "
                                          rf"/path/to/{weights}, or --pretrained none"):
        resolve_config({"dataset": dataset, "data_root": "x"})
    assert resolve_config({"dataset": dataset, "data_root": "x", "pretrained": "none"}).pretrained == "none"
    assert resolve_config({"dataset": dataset, "data_root": "x", "resume": "last.pt"}).pretrained is None
    assert resolve_config({"dataset": "folder", "data_root": "x"}).pretrained is None  # one's own data: a choice


def test_resume_auto_without_a_checkpoint_needs_pretrained_too(tmp_path):
    with pytest.raises(ConfigError, match=r"--dataset cityscapes needs --pretrained \(--resume auto found no .*last.pt\)"):
        run.main(["--dataset", "cityscapes", "--data-root", str(tmp_path), "--out", str(tmp_path / "run"),
                  "--resume", "auto", "--device", "cpu"])


def test_config_values_are_typed_and_checked_in_one_place(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-3\nmulti_grid: 'false'\n")  # YAML 1.1 reads 1e-3 as text
    cfg = resolve_config({"dataset": "cityscapes", "data_root": "x", "pretrained": "none"}, config)
    assert cfg.lr == 0.001 and cfg.multi_grid is False and cfg.options == {"clicks": 100, "train_list": None,
                                                                            "val_list": None}
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # frozen
    for text, message in [("epochs: 0\n", r"epochs=0 is invalid; expected an integer >= 1"),
                          ("backbone: resnet999\n", r"backbone='resnet999' is invalid; expected one of"),
                          ("clicks: 30\n", r"clicks=30 is not a Cityscapes setting; expected one of \[20, 50, 100\]")]:
        config.write_text(text)
        with pytest.raises(ConfigError, match=message):
            resolve_config({"dataset": "cityscapes", "data_root": "x", "pretrained": "none"}, config)


def test_a_new_data_format_is_one_row_that_training_synthetic_and_checkpoints_see(tmp_path, monkeypatch):
    """A test-only format (flat images/ and masks/ folders, two classes, its own --shade flag) added as one row."""
    import dataclasses

    from agmm_deploy.datasets import DATA_FORMATS, Flag, Sample
    from agmm_deploy.datasets.synthetic import save_png

    def samples(root, options):
        assert options == {"shade": "light"}
        return [Sample(p, root / "masks" / p.name) for p in sorted((root / "images").glob("*.png"))]

    def write(root, split, index, rng, height, width, click_radius):
        label = np.full((height, width), 255, np.uint8)
        label[: height // 2, : width // 2], label[height // 2:, width // 2:] = 0, 1
        save_png(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), root / "images" / f"{index}.png")
        save_png(label, root / "masks" / f"{index}.png")
        return str(index)

    row = dataclasses.replace(
        get_format("folder"), name="tiny", title="Tiny", layout="images/*.png, masks/*.png", classes=("bg", "fg"),
        palette=((0, 0, 0), (255, 255, 255)), read_classes=None, official_mode=lambda value: {},
        model=dict(backbone="resnet18", num_classes=2, multi_grid=False, aspp_rates=(1, 2, 3)),
        recipe=dict(crop_size=32, epochs=1, batch_size=2, lr=0.01, head_lr_mult=1.0, colour_aug=False),
        flags=(Flag("shade", str, ("dark", "light"), "dark", "test-only"),), train_samples=samples,
        val_samples=lambda root, options: None, write_synthetic=write, finish_synthetic=lambda root, ids: None,
        official_input_size=(32, 32))
    monkeypatch.setitem(DATA_FORMATS, "tiny", row)

    data = synthetic.main(["--dataset", "tiny", "--out", str(tmp_path / "data"), "--num-train", "4", "--num-val", "0",
                           "--height", "40", "--width", "40"])
    assert sorted(p.name for p in (data.root / "masks").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    out = tmp_path / "run"
    result = run.main(["--dataset", "tiny", "--shade", "light", "--data-root", str(data.root), "--out", str(out),
                       "--device", "cpu", "--workers", "0", "--max-steps", "2", "--log-every", "1"])
    assert result.step == 2 and result.best_checkpoint is None
    assert "no validation split: no mIoU is measured and no best.pt is written" in (out / "train.log").read_text()
    loaded = load_model(out / "last.pt")
    assert loaded.meta.dataset == "tiny" and loaded.meta.classes == ("bg", "fg")
    assert loaded.config.aspp_rates == (1, 2, 3) and loaded.meta.input_size == (32, 32)
    raw = tmp_path / "raw.pth"
    torch.save(loaded.model.state_dict(), raw)  # as the official code would save a model of this recipe
    assert load_model(raw, backbone="resnet18", num_classes=2, dataset="tiny").config == loaded.config
    with pytest.raises(ConfigError, match="--shade is not used by --dataset cityscapes"):
        run.main(tiny_args(tmp_path, tmp_path / "x", "--shade", "dark"))  # refused before any file is read


def test_a_full_disk_ends_with_one_sentence_and_exit_2(city_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.k1ll3d.tmp").write_bytes(b"PK half a checkpoint of a killed run")

    def full_disk(obj, f):
        f.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    assert run.cli(tiny_args(city_root, out, "--epochs", "1", "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's lines
    assert err.startswith(f"error: could not write {out / 'last.pt'} (") and err.endswith("checkpoint is kept")
    assert "unexpected pos" in err and "--resume auto" in err
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []  # ours removed, the new one too
    assert "removed 1 temporary file(s) of an interrupted write: .last.pt.k1ll3d.tmp" in (out / "train.log").read_text()


def test_data_errors_stop_at_start_up_with_one_sentence_and_exit_2(city_root, tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(city_root, unlabelled)
    for label in (unlabelled / "20clicks").glob("*.png"):
        Image.fromarray(np.full((48, 96), 255, np.uint8)).save(label)
    assert run.cli(tiny_args(unlabelled, tmp_path / "a", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: none of the 8 training labels under {unlabelled} holds a labelled pixel (every value is 19 "
                   "or 255): there is nothing to learn from. Check --data-root and that the labels hold class ids "
                   "0..18")
    rgb = tmp_path / "rgb"
    shutil.copytree(city_root, rgb)
    victim = sorted((rgb / "20clicks").glob("*.png"))[-1]  # the last file: reached late by a batch, early here
    Image.fromarray(np.zeros((48, 96, 3), np.uint8)).save(victim)
    assert run.cli(tiny_args(rgb, tmp_path / "b", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: label {victim} has mode RGB") and len(err.splitlines()) == 1
    assert not (tmp_path / "b" / "metrics.jsonl").exists()  # refused before the first step


def test_more_processes_than_gpus_stop_before_nccl(monkeypatch):
    from training import distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("NCCL was started"))
    with pytest.raises(distributed.DeviceError, match=r"torchrun started 2 processes on this node but 1 CUDA "
                                                      r"device\(s\) are visible .* --nproc-per-node 1 or fewer"):
        distributed.init_distributed("auto")


def test_each_epoch_gives_every_rank_a_disjoint_shard_in_a_new_order(city_root):
    from torch.utils.data import DistributedSampler

    from training.data import EpochSampler, SegmentationDataset

    samples = get_format("cityscapes").train_samples(city_root, {"clicks": 20})
    dataset = SegmentationDataset(samples, 19, train=True, crop_size=32)
    samplers = [EpochSampler(len(dataset), 2, rank, seed=0) for rank in (0, 1)]
    orders = []
    for epoch in (0, 1):
        shards = []
        for rank, sampler in enumerate(samplers):
            run.set_epoch(epoch, 0, rank, dataset, sampler, torch.Generator())
            shards.append(list(sampler))
            reference = DistributedSampler(dataset, 2, rank, shuffle=True, seed=0)
            reference.set_epoch(epoch)
            assert shards[-1] == list(reference)  # DistributedSampler's order, which it can also start mid-way
        assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(8))
        orders.append(shards)
        assert dataset.epoch == epoch
    assert orders[0] != orders[1]  # reshuffled: without set_epoch every epoch repeats epoch 0's order
