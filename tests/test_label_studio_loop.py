"""agmm_deploy.labels.loop and ``agmm-labels train``: a round against the stand-in Label Studio serving the
project export captured from a real Label Studio 1.23.2 (clicks and a brush stroke on two uploaded images):
a fresh round and one fine-tuned from its checkpoint each end with a model whose parity passed, and what cannot
be trained is refused with its sentence."""

from __future__ import annotations

import json

import pytest

from agmm_deploy.cli import labels as cli
from agmm_deploy.contract import read_onnx_metadata
from agmm_deploy.labels.annotations import LabelsError
from agmm_deploy.labels.loop import fetch_task_images, train_from_label_studio

from label_studio_stand_in import API_KEY, DATA, PROJECT, Recorder, label_studio_answer

CLASSES = ("background", "disk", "box")
FAST = ("--backbone", "resnet18", "--stem", "torchvision", "--crop-size", "64", "--batch-size", "2", "--max-steps",
        "2", "--epochs", "1", "--pretrained", "none", "--workers", "0", "--device", "cpu")


@pytest.fixture(scope="module")
def label_studio():
    server = Recorder(label_studio_answer)
    yield server
    server.shutdown()


def test_the_annotated_tasks_images_are_read_from_label_studio_under_their_names(label_studio, tmp_path):
    tasks = json.loads((DATA / "export.json").read_text())
    written = fetch_task_images(tasks, label_studio.url, API_KEY, tmp_path)
    assert sorted(p.name for p in written) == ["scene0.png", "scene1.png"]
    assert all(p.read_bytes() == (DATA / "images" / p.name).read_bytes() for p in written)


def test_a_project_with_nothing_annotated_is_refused_by_the_cli_with_a_sentence(label_studio, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", API_KEY)
    code = cli.main(["train", "--label-studio", label_studio.url, "--project", str(PROJECT + 1),
                     "--out", str(tmp_path / "r")])
    assert code == 2
    assert f"project {PROJECT + 1} on" in (err := capsys.readouterr().err) and "none annotated" in err
    assert not (tmp_path / "r" / "export.json").exists()


def test_a_wrong_api_key_is_named(label_studio, tmp_path):
    with pytest.raises(LabelsError, match="401.*LABEL_STUDIO_API_KEY"):
        train_from_label_studio(label_studio.url, "wrong", PROJECT, tmp_path / "r")


@pytest.mark.slow
def test_a_fresh_round_and_one_fine_tuned_from_it_each_write_a_checked_model(label_studio, tmp_path):
    lines = []
    first = train_from_label_studio(label_studio.url, API_KEY, PROJECT, tmp_path / "r1", classes=CLASSES,
                                    train_args=FAST, log=lines.append)
    assert first.images == 2 and first.model.is_file()
    assert json.loads((tmp_path / "r1" / "ready.json").read_text())["model_version"] == first.model_version
    assert read_onnx_metadata(first.model)[0].classes == CLASSES
    assert any("step 1/" in line for line in lines) and any("parity PASSED" in line for line in lines)

    with pytest.raises(LabelsError, match="fine-tuning keeps a model's classes"):
        train_from_label_studio(label_studio.url, API_KEY, PROJECT, tmp_path / "bad", start=first.checkpoint,
                                classes=("disk", "box", "background"))
    lines.clear()
    second = train_from_label_studio(label_studio.url, API_KEY, PROJECT, tmp_path / "r2", start=first.checkpoint,
                                     train_args=FAST[4:], log=lines.append)  # backbone and stem from the checkpoint
    assert any(f"weights of {tmp_path / 'r2' / 'start.pt'}" in line for line in lines)
    assert second.model_version != first.model_version and read_onnx_metadata(second.model)[0].classes == CLASSES
    with pytest.raises(LabelsError, match="already holds a round"):
        train_from_label_studio(label_studio.url, API_KEY, PROJECT, tmp_path / "r2")
