"""The Ray engine on a one-machine Ray cluster shared by the module: the same bytes as the local engine, the
manifest, bad inputs, rerun and delete-three, and kill -9 of the driver mid-run."""

import os
import signal
import subprocess
import threading
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from agmm_deploy.bulk import predict_images
from bulk_data import TREE, image_tree, pngs, tiny_model

ray = pytest.importorskip("ray", reason="the Ray engine needs pip install 'agmm-deploy[ray]'")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bulk_ray")
    images = image_tree(folder / "images")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(np.zeros((200, 200, 3), dtype=np.uint8)).save(images / "huge.png")
    return tiny_model(folder), images


def test_ray_writes_the_local_engines_bytes_and_manifest(cluster, setup, tmp_path):
    model, images = setup
    settings = dict(device="cpu", progress=False, max_pixels=30000)
    local = predict_images(model, [images], tmp_path / "local", **settings)
    result = predict_images(model, [images], tmp_path / "ray", engine="ray", **settings)
    assert (result.written, result.failed) == (local.written, local.failed) == (len(TREE), 2)
    assert sorted(pngs(tmp_path / "ray")) == sorted(name.rsplit(".", 1)[0] + ".png" for name, _ in TREE)
    assert pngs(tmp_path / "ray") == pngs(tmp_path / "local")  # letterboxed, tiled, same stems elsewhere
    rows = pq.read_table(tmp_path / "ray" / "manifest.parquet").to_pylist()
    assert rows == pq.read_table(tmp_path / "local" / "manifest.parquet").to_pylist()
    by_name = {os.path.basename(row["path"]): row for row in rows}
    assert by_name["corrupt.jpg"]["status"] == "failed" and "could not be decoded" in by_name["corrupt.jpg"]["error"]
    assert by_name["huge.png"]["status"] == "failed" and "the limit is 30000" in by_name["huge.png"]["error"]
    for row in rows:
        if row["status"] == "ok":
            labels = np.asarray(Image.open(tmp_path / "ray" / row["output"]))
            assert (row["height"], row["width"]) == labels.shape
            assert row["fraction_background"] == pytest.approx((labels == 0).mean(), abs=1e-6)


def test_ray_rerun_skips_all_and_recomputes_exactly_three_deleted(cluster, setup, tmp_path):
    model, images = setup
    settings = dict(device="cpu", progress=False, max_pixels=30000, engine="ray")
    predict_images(model, [images], tmp_path, **settings)
    first = pngs(tmp_path)
    again = predict_images(model, [images], tmp_path, **settings)
    assert (again.resumed, again.written) == (len(TREE), 0)  # the two failed inputs are tried again
    deleted = ["a/x.png", "a/wide.png", "b/c/x.png"]
    for name in deleted:
        (tmp_path / name).unlink()
    stamps = {name: (tmp_path / name).stat().st_mtime_ns for name in first if name not in deleted}
    third = predict_images(model, [images], tmp_path, **settings)
    assert (third.resumed, third.written) == (len(TREE) - 3, 3)
    assert pngs(tmp_path) == first
    assert stamps == {name: (tmp_path / name).stat().st_mtime_ns for name in stamps}


def test_kill_9_of_the_driver_mid_run_then_a_rerun_completes(cluster, setup, tmp_path):
    model, _ = setup
    images = image_tree(tmp_path / "many", [(f"d{i % 4}/img{i:03d}.png", (96, 96)) for i in range(40)])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "agmm_deploy.cli.predict", str(model), str(images), "--out", str(out),
            "--engine", "ray", "--device", "cpu", "--ray-address", cluster, "--no-progress"]
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(pngs(out) if out.exists() else {}) < 3 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert driver.poll() is None, "the run ended before it could be killed; give it more images"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (out / "manifest.parquet").exists() and len(pngs(out)) < 40
    result = predict_images(model, [images], out, engine="ray", device="cpu", progress=False)
    assert result.resumed + result.written == 40 and result.failed == 0
    written = pngs(out)
    assert len(written) == 40
    for name in written:
        with Image.open(out / name) as image:
            image.load()  # a truncated PNG would raise here
            assert image.size == (96, 96) and image.mode == "P"
    assert len(pq.read_table(out / "manifest.parquet")) == 40
    assert not list(out.rglob("*.tmp"))  # the killed run's temporary files swept by the rerun


def test_file_uris_through_the_ray_workers(cluster, setup, tmp_path):
    model, images = setup
    settings = dict(device="cpu", progress=False, max_pixels=30000)
    predict_images(model, [images], tmp_path / "local", **settings)
    result = predict_images(model, [images.as_uri()], tmp_path / "ray", engine="ray", **settings)
    assert result.written == len(TREE) and pngs(tmp_path / "ray") == pngs(tmp_path / "local")


def _model_actor_pids() -> list[int]:
    """The processes of this machine whose title names the Segmenter actor (ray::MapWorker(...Segmenter...))."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if title.startswith("ray::") and "Segmenter" in title:
            pids.append(int(entry))
    return pids


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state: the parent
        except (OSError, ValueError, IndexError):
            return False
    return False


def test_kill_9_of_the_model_actor_mid_run_is_replaced_and_its_inputs_retried(cluster, setup, tmp_path):
    model, _ = setup
    images = image_tree(tmp_path / "many", [(f"d{i % 4}/img{i:03d}.png", (96, 96)) for i in range(48)])
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_the_actor_once_outputs_appear() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            pids = _model_actor_pids()
            if pids and out.exists() and len(pngs(out)) >= 3:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_actor_once_outputs_appear)
    killer.start()
    result = predict_images(model, [images], out, engine="ray", device="cpu", progress=False)
    killer.join()
    assert killed, "no model actor was found to kill"
    assert (result.written, result.failed, result.skipped) == (48, 0, 0), result.failures
    assert len(pngs(out)) == 48
    for name in pngs(out):
        with Image.open(out / name) as image:
            image.load()
            assert image.size == (96, 96) and image.mode == "P"
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == len({row["path"] for row in rows}) == 48  # every input once, none lost, none twice
    assert not list(out.rglob("*.tmp"))


def test_without_an_address_the_engine_starts_its_own_cluster_with_workers_at_niceness_0(cluster, setup, tmp_path):
    # The module's cluster is running on this machine; ray.init(address=None) would join it. The engine starts
    # its own ("local"), whose workers run at niceness 0 so that nice-0 processes do not stall the model.
    model, _ = setup
    images = image_tree(tmp_path / "many", [(f"img{i:03d}.png", (96, 96)) for i in range(48)])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k != "RAY_worker_niceness"}
    argv = [sys.executable, "-m", "agmm_deploy.cli.predict", str(model), str(images), "--out", str(tmp_path / "out"),
            "--engine", "ray", "--device", "cpu", "--no-progress"]
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    niceness: set[int] = set()
    while driver.poll() is None:
        for pid in _model_actor_pids():
            if not _descends_from(pid, driver.pid):  # the module's cluster's actors (Ray's default, 15) linger
                continue
            try:
                niceness.add(os.getpriority(os.PRIO_PROCESS, pid))
            except OSError:
                pass
        time.sleep(0.05)
    output = driver.stdout.read()
    assert driver.returncode == 0, output
    assert "48 written" in output
    assert niceness == {0}, (niceness, output)  # 15 would mean it joined the module's cluster (Ray's default)
