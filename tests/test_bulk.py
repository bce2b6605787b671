"""agmm_deploy.bulk with the local engine: inputs, the manifest, resuming, bad and unreadable inputs, atomic
writes. The Ray engine's tests are in test_bulk_ray.py."""

import errno
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from agmm_deploy.bulk import BulkError, predict_images
from agmm_deploy.bulk.inputs import InputError, collect_inputs
from agmm_deploy.cli.predict import main
from agmm_deploy.inference import segment_image
from agmm_deploy.runtime import load_runner
from agmm_deploy.transforms import palette_png, read_image
from bulk_data import TREE, image_tree, pngs, tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bulk")
    return tiny_model(folder), image_tree(folder / "images")


def test_outputs_mirror_the_tree_with_the_bytes_of_the_one_image_loop(setup, tmp_path):
    model, images = setup
    result = predict_images(model, [images], tmp_path, device="cpu", progress=False)
    assert (result.total, result.written, result.failed, result.skipped) == (len(TREE), len(TREE), 0, 0)
    runner = load_runner(model, "cpu")
    written = pngs(tmp_path)
    assert sorted(written) == sorted(name.rsplit(".", 1)[0] + ".png" for name, _ in TREE)
    for name, _ in TREE:
        expected = palette_png(segment_image(runner, read_image(images / name)), runner.meta.palette)
        assert written[name.rsplit(".", 1)[0] + ".png"] == expected, name


def test_manifest_rows_and_fractions_match_the_masks(setup, tmp_path):
    model, images = setup
    predict_images(model, [images], tmp_path, device="cpu", progress=False)
    table = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    assert [row["path"] for row in table] == [str(p) for p in sorted(images.rglob("*.*"))]
    classes = load_runner(model, "cpu").meta.classes
    for row in table:
        labels = np.asarray(Image.open(tmp_path / row["output"]))
        assert row["status"] == "ok" and row["error"] == "" and (row["height"], row["width"]) == labels.shape
        assert row["model"] == "voc.pt" and row["precision"] == "fp32" and row["inputs"] >= 1
        fractions = np.array([row[f"fraction_{name}"] for name in classes])
        np.testing.assert_allclose(fractions, np.bincount(labels.ravel(), minlength=21) / labels.size, atol=1e-6)


def test_manifests_as_inputs(setup, tmp_path):
    model, images = setup
    names = ["a/x.png", "b/c/x.png"]
    (images / "list.txt").write_text("# two images\n" + "\n".join(names) + "\n")
    pcsv.write_csv(pa.table({"path": [str(images / n) for n in names]}), tmp_path / "list.csv")
    pq.write_table(pa.table({"path": names}), images / "list.parquet")
    try:
        for manifest in (images / "list.txt", tmp_path / "list.csv", images / "list.parquet"):
            assert [e.key for e in collect_inputs([manifest])] == ["a/x", "b/c/x"], manifest
        result = predict_images(model, [images / "list.txt"], tmp_path / "o", device="cpu", progress=False)
        assert result.written == 2 and sorted(pngs(tmp_path / "o")) == ["a/x.png", "b/c/x.png"]
    finally:
        for name in ("list.txt", "list.parquet"):
            (images / name).unlink()
    pq.write_table(pa.table({"file": names}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="expected a column named 'path'"):
        collect_inputs([tmp_path / "bad.parquet"])


def test_rerun_skips_complete_outputs_and_recomputes_exactly_the_deleted(setup, tmp_path, capsys):
    model, images = setup
    argv = [str(model), str(images), "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    first = pngs(tmp_path)
    assert main(argv) == 0
    assert f"0 written, {len(TREE)} already complete" in capsys.readouterr().out
    deleted = ["a/x.png", "a/wide.png", "b/c/x.png"]
    for name in deleted:
        (tmp_path / name).unlink()
    stamps = {name: (tmp_path / name).stat().st_mtime_ns for name in first if name not in deleted}
    assert main(argv) == 0
    assert f"3 written, {len(TREE) - 3} already complete" in capsys.readouterr().out
    assert pngs(tmp_path) == first
    assert stamps == {name: (tmp_path / name).stat().st_mtime_ns for name in stamps}  # the others untouched
    assert len(pq.read_table(tmp_path / "manifest.parquet")) == len(TREE)


def test_corrupt_oversized_and_unreadable_inputs_are_rows_with_sentences(setup, tmp_path, capsys):
    model, images = setup
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "ok.png").write_bytes((images / "a" / "x.png").read_bytes())
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (bad / "truncated.png").write_bytes((images / "b" / "c" / "x.png").read_bytes()[:200])
    Image.fromarray(np.zeros((200, 200, 3), dtype=np.uint8)).save(bad / "huge.png")
    (bad / "mem.png").symlink_to("/proc/self/mem")
    (bad / "gone.png").symlink_to(bad / "nowhere.png")
    (bad / "folder.png").mkdir()
    os.mkfifo(bad / "pipe.png")
    code = main([str(model), str(bad), "--out", str(tmp_path / "o"), "--device", "cpu", "--max-pixels", "30000",
                 "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    rows = {os.path.basename(r["path"]): r for r in pq.read_table(tmp_path / "o" / "manifest.parquet").to_pylist()}
    assert rows["ok.png"]["status"] == "ok" and (tmp_path / "o" / "ok.png").is_file()
    for name in ("corrupt.jpg", "truncated.png", "huge.png"):
        assert rows[name]["status"] == "failed" and str(bad / name) in err, name
    assert "the limit is 30000" in rows["huge.png"]["error"]
    assert "a kernel file, not an image; it was not read" in rows["mem.png"]["error"]
    assert "could not be read (No such file or directory)" in rows["gone.png"]["error"]
    for name in ("folder.png", "pipe.png"):
        assert "is not a regular file" in rows[name]["error"], name
    for name in ("mem.png", "gone.png", "folder.png", "pipe.png"):
        assert rows[name]["status"] == "skipped", name
    assert sorted(pngs(tmp_path / "o")) == ["ok.png"]


def test_unwritable_out_is_refused_before_any_work(setup, tmp_path, capsys):
    model, images = setup
    (tmp_path / "file").write_text("")
    assert main([str(model), str(images), "--out", str(tmp_path / "file")]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    for out, reason in ((tmp_path / "file" / "sub", "Not a directory"), ("/sys/agmm-bulk-test", "Operation not permitted")):
        assert main([str(model), str(images), "--out", str(out)]) == 2
        assert f"--out {out} cannot be written ({reason})" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.onnx"), str(images), "--out", "/sys/agmm-bulk-test"]) == 2
    assert "cannot be written" in capsys.readouterr().err  # refused before the model is even looked at


def test_a_full_disk_leaves_no_truncated_png(setup, tmp_path, monkeypatch):
    model, images = setup

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)  # the bytes are in the temporary file; the disk fills at fsync
    result = predict_images(model, [images], tmp_path, device="cpu", progress=False)
    monkeypatch.undo()
    assert result.failed == len(TREE) and "No space left on device" in result.failures[0]
    assert "manifest.parquet: could not be written (No space left on device)" in result.failures[-1]
    left = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert all(not name.endswith(".png") and not name.endswith(".tmp") for name in left), left
    result = predict_images(model, [images], tmp_path, device="cpu", progress=False)  # space again: a rerun
    assert result.written == len(TREE)


def test_unusable_arguments_exit_2(setup, tmp_path, capsys):
    model, images = setup
    with pytest.raises(BulkError, match="no images in"):
        predict_images(model, [tmp_path], tmp_path / "o")
    with pytest.raises(BulkError, match="could not be read as a URI"):
        predict_images(model, ["nosuch://bucket/images"], tmp_path / "o")
    assert main([str(model), str(images), "--out", "s3://bucket/labels"]) == 2
    assert "--out s3://bucket/labels is a URI; outputs go to a local folder" in capsys.readouterr().err
    assert main([str(model), str(images), "--out", str(tmp_path / "o"), "--overlap", "1"]) == 2
    assert "overlap=1.0 is invalid" in capsys.readouterr().err


def test_a_second_run_on_the_same_out_is_refused_while_another_holds_it(setup, tmp_path, capsys):
    model, images = setup
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from agmm_deploy.bulk import run_lock\n"
         f"with run_lock(Path({str(tmp_path)!r})):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = [str(model), str(images), "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"another run is writing to --out {tmp_path} (pid {holder.pid} on" in err
        assert not pngs(tmp_path)  # refused before any work
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert main(argv) == 0 and len(pngs(tmp_path)) == len(TREE)  # the lock went with the holder


def test_the_temporary_files_of_a_killed_run_are_swept_and_no_others(setup, tmp_path):
    model, images = setup
    predict_images(model, [images], tmp_path, device="cpu", progress=False)
    # What a writer killed between mkstemp and the rename leaves: atomic_write's own temporary names.
    stale = [tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_path / folder)[1]
             for folder, name in (("a", "x.png"), ("b/c", "y.png"))]
    (tmp_path / "a" / ".keep").write_text("the user's")
    (tmp_path / "a" / "notes.tmp").write_text("the user's too")
    lines = []
    result = predict_images(model, [images], tmp_path, device="cpu", progress=False, on_start=lines.append)
    assert result.resumed == len(TREE) and "2 temporary file(s) of a killed run removed" in lines[0]
    assert not any(os.path.exists(path) for path in stale)
    assert (tmp_path / "a" / ".keep").exists() and (tmp_path / "a" / "notes.tmp").exists()


def test_file_uris_read_as_their_paths_with_the_same_checks(setup, tmp_path):
    model, images = setup
    local = predict_images(model, [images], tmp_path / "local", device="cpu", progress=False)
    predict_images(model, [images.as_uri()], tmp_path / "uri", device="cpu", progress=False)
    assert pngs(tmp_path / "uri") == pngs(tmp_path / "local") and len(pngs(tmp_path / "local")) == local.written
    rows = pq.read_table(tmp_path / "uri" / "manifest.parquet").to_pylist()
    assert all(row["path"].startswith("file:///") for row in rows)
    listed = tmp_path / "list.txt"
    listed.write_text(f"{(images / 'a' / 'x.png').as_uri()}\n{(images / 'b' / 'x.jpg').as_uri()}\n"
                      "file:///proc/self/mem\n")
    result = predict_images(model, [listed], tmp_path / "listed", device="cpu", progress=False)
    assert (result.written, result.skipped) == (2, 1)
    assert "a kernel file, not an image" in " ".join(result.failures)  # a URI gets no way round the checks
    with pytest.raises(BulkError, match="does not exist"):
        predict_images(model, [(tmp_path / "nowhere").as_uri()], tmp_path / "o")


def test_s3_inputs_from_a_real_s3_endpoint(setup, tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="the S3 test needs moto[server] (the dev extra)")
    import pyarrow.fs as pafs

    model, images = setup
    for name, value in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_EC2_METADATA_DISABLED="true",
                            AWS_DEFAULT_REGION="us-east-1").items():
        monkeypatch.setenv(name, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = f"?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
        bucket, _ = pafs.FileSystem.from_uri(f"s3://photos/{options}&allow_bucket_creation=true")
        bucket.create_dir("photos")
        for path in sorted(images.rglob("*.*")):
            with bucket.open_output_stream(f"photos/tree/{path.relative_to(images).as_posix()}") as f:
                f.write(path.read_bytes())
        local = predict_images(model, [images], tmp_path / "local", device="cpu", progress=False)
        result = predict_images(model, [f"s3://photos/tree{options}"], tmp_path / "s3", device="cpu",
                                progress=False)
        assert result.written == local.written == len(TREE)
        assert pngs(tmp_path / "s3") == pngs(tmp_path / "local")
        listed = tmp_path / "list.csv"
        listed.write_text(f"path\ns3://photos/tree/a/y.jpg{options}\ns3://photos/tree/gone.png{options}\n")
        result = predict_images(model, [listed], tmp_path / "listed", device="cpu", progress=False)
        assert (result.written, result.skipped) == (1, 1) and "gone.png" in result.failures[0]
        assert "does not exist" in result.failures[0]
    finally:
        server.stop()


def test_the_ray_engines_decode_and_write_workers_start_without_torch():
    # Ray imports this module in every decode and write worker; torch there would cost each worker seconds of
    # CPU beside the model on a small machine (only the model actor needs it).
    probe = "import sys, agmm_deploy.bulk.ray_data; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_cpu_actors_are_single_threaded_one_per_core_up_to_eight_a_node():
    from agmm_deploy.bulk.ray_data import cpu_actor_plan

    assert cpu_actor_plan([2]) == (2, 1)
    assert cpu_actor_plan([2, 2]) == (4, 1)
    assert cpu_actor_plan([32]) == (8, 4)  # capped: each actor holds a model, so more cores mean more threads
    assert cpu_actor_plan([16, 4]) == (12, 1)  # threads the smallest node can give every actor
    assert cpu_actor_plan([0]) == (1, 1)
