"""agmm-labels: the committed tool fixtures import into the folder layout with every mark where it belongs,
each kind of bad annotation is refused with its sentence and nothing written, and predictions go back to the
tools as pre-annotations our readers parse again.

The fixtures under tests/data/labels were written by the tools' own writers (tests/data/labels/make_fixtures.py
says which); this suite needs none of the tools.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agmm_deploy.cli import labels as cli
from agmm_deploy.constants import IGNORE_INDEX
from agmm_deploy.labels import cvat, detect_format, label_studio
from agmm_deploy.labels.annotations import PredictedImage
from agmm_deploy.labels.rasterize import rasterize
from agmm_deploy.transforms import palette_png
from agmm_deploy.datasets.folder import read_classes as trainer_classes

DATA = Path(__file__).resolve().parent / "data" / "labels"
IMAGES = DATA / "images"
CLASSES = ("background", "disk", "box")
BACKGROUND, DISK, BOX = range(3)


def run_import(annotations, out, *extra, images=IMAGES):
    return cli.main(["import", str(annotations), "--images", str(images), "--out", str(out), *extra])


def read_png(path):
    return np.asarray(Image.open(path))


def disk_pixels(label, x, y, value, radius=2):
    """Asserts the disk of a click at pixel (x, y) holds value; returns how many pixels it has."""
    yy, xx = np.mgrid[0:label.shape[0], 0:label.shape[1]]
    disk = (yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2
    assert (label[disk] == value).all()
    return int(disk.sum())


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "staging folder left behind"


# ---- the tools' fixtures -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fmt", [("cvat.xml", "cvat"), ("label_studio.json", "label-studio"),
                                       ("coco_keypoints.json", "coco"), ("clicks.csv", "csv")])
def test_format_is_detected_from_the_file(name, fmt):
    assert detect_format(DATA / name).name == fmt


def test_cvat_xml_written_by_datumaro_imports_clicks_scribble_polygon_and_mask(tmp_path, capsys):
    out = tmp_path / "data"
    assert run_import(DATA / "cvat.xml", out) == 0
    assert list(trainer_classes(out)[0]) == list(CLASSES)  # the trainer's format, ids in CVAT's order
    assert sorted(p.name for p in (out / "train" / "images").iterdir()) == ["img_0.png", "img_1.png", "img_2.png"]
    label = read_png(out / "train" / "labels" / "img_0.png")  # (48, 64)
    assert label.shape == (48, 64)
    disk_pixels(label, 14, 16, DISK)
    disk_pixels(label, 45, 31, BOX)
    disk_pixels(label, 60, 5, BACKGROUND)
    # the polygon (36, 34)-(54, 39) in corner coordinates covers columns 36..53 and rows 34..38 exactly
    assert (label[34:39, 36:54] == BOX).all() and (label[39:41, 36:54] != BOX).all()
    assert (label[28:36, 2:12] == BACKGROUND).all()  # CVAT's mask RLE: a painted 10 x 8 patch at (2, 28)
    assert (label[16, 9:19] == DISK).all()  # the scribble from (9, 16) to (19, 17), 3 pixels wide
    assert label[0, 0] == IGNORE_INDEX and (label != IGNORE_INDEX).mean() < 0.2  # sparse: mostly unlabelled
    printed = capsys.readouterr().out
    assert "imported 3 image(s)" in printed and "clicks per image: mean 4.0" in printed
    assert "scribbles per image: mean 1.0" in printed
    assert "images with no label at all (not written): 1: img_3.png" in printed


def test_label_studio_export_imports_keypoints_polygon_and_brush_rle_as_cvat_does(tmp_path):
    """The LS fixture, exported by a real Label Studio 1.23.2 server, holds the same clicks, polygon and painted
    patch as the CVAT one, minus the scribble; its brush RLE comes from Label Studio's own encoder, so this
    checks our decoder against theirs."""
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    assert run_import(DATA / "label_studio.json", tmp_path / "ls", "--classes", str(classes)) == 0
    assert run_import(DATA / "cvat.xml", tmp_path / "cvat") == 0
    # Label Studio's upload prefix ("/data/upload/1/bc557573-img_0.png") is stripped to find img_*.png
    for stem in ("img_0", "img_1", "img_2"):
        ls = read_png(tmp_path / "ls" / "train" / "labels" / f"{stem}.png")
        ref = read_png(tmp_path / "cvat" / "train" / "labels" / f"{stem}.png")
        scribble = (ref == DISK) & (ls == IGNORE_INDEX)
        assert scribble.any() and (ls[~scribble] == ref[~scribble]).all()
    # A JSON export keeps no label list: without --classes, ids follow the order of first use
    assert run_import(DATA / "label_studio.json", tmp_path / "ls_own") == 0
    assert list(trainer_classes(tmp_path / "ls_own")[0]) == ["disk", "box", "background"]


def test_coco_keypoints_and_csv_give_the_same_clicks(tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("background 0 0 0\ndisk 220 60 60\nbox 60 160 220\n")  # colours after the name are allowed
    assert run_import(DATA / "coco_keypoints.json", tmp_path / "coco", "--classes", str(classes)) == 0
    assert run_import(DATA / "clicks.csv", tmp_path / "csv", "--classes", str(classes), "--click-radius", "3") == 0
    coco = read_png(tmp_path / "coco" / "train" / "labels" / "img_1.png")
    csv = read_png(tmp_path / "csv" / "train" / "labels" / "img_1.png")
    assert disk_pixels(coco, 18, 16, DISK) == 13 and disk_pixels(csv, 18, 16, DISK, radius=3) == 29
    assert ((coco != IGNORE_INDEX) <= (csv != IGNORE_INDEX)).all()  # radius 3 disks contain the radius 2 ones
    assert list(trainer_classes(tmp_path / "csv")[0]) == list(CLASSES)
    assert "labelled pixels per class: background 78, disk 39, box 39" in capsys.readouterr().out


def test_later_marks_win_where_shapes_overlap():
    """Filled regions first, scribbles next, clicks last: a click inside a painted region keeps its class."""
    from agmm_deploy.labels.annotations import Shape

    region = Shape("polygon", "background", np.array([[0.0, 0.0], [20.0, 0.0], [20.0, 20.0], [0.0, 20.0]]))
    click = Shape("point", "disk", np.array([[10.5, 10.5]]))
    label = rasterize([click, region], {"background": 0, "disk": 1}, 20, 20, click_radius=0, scribble_width=3)
    assert label[10, 10] == 1 and (label == 0).sum() == 399


# ---- bad annotations: one sentence each, exit 2, nothing written ----------------------------------------------

def _cvat_with(tmp_path, old, new):
    path = tmp_path / "export.xml"
    text = (DATA / "cvat.xml").read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def test_bad_label_name_lists_both(tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("background\ndisk\n")
    out = tmp_path / "out"
    assert run_import(DATA / "cvat.xml", out, "--classes", str(classes)) == 2
    err = capsys.readouterr().err
    assert "the export uses label(s) ['box'] that are not in --classes ['background', 'disk']" in err
    assert "Traceback" not in err
    assert_nothing_written(out)


def test_label_missing_from_the_exports_own_list(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_import(_cvat_with(tmp_path, 'points label="box"', 'points label="car"'), out) == 2
    assert ("uses label(s) ['car'] that are not in the export's label list ['background', 'disk', 'box']"
            in capsys.readouterr().err)
    assert_nothing_written(out)


def test_shape_outside_its_image(tmp_path, capsys):
    out = tmp_path / "out"
    path = _cvat_with(tmp_path, 'points="36.00,34.00;54.00,34.00', 'points="36.00,34.00;70.00,34.00')
    assert run_import(path, out) == 2
    assert ("image img_0.png (64x48): a polygon of 'box' spans x 36..70, y 34..39, outside the image"
            in capsys.readouterr().err)
    assert_nothing_written(out)


def test_click_outside_its_image_in_a_csv(tmp_path, capsys):
    csv = tmp_path / "clicks.csv"
    csv.write_text("image,x,y,class\nimg_0.png,10,10,disk\nimg_0.png,10,-3,background\n")
    out = tmp_path / "out"
    assert run_import(csv, out) == 2
    assert "a point of 'background' spans x 10..10, y -3..-3, outside the image" in capsys.readouterr().err
    assert_nothing_written(out)


def test_annotated_image_missing_on_disk(tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(IMAGES, images)
    (images / "img_2.png").unlink()
    out = tmp_path / "out"
    assert run_import(DATA / "cvat.xml", out, images=images) == 2
    assert f"image img_2.png is annotated in the export but is not in {images}" in capsys.readouterr().err
    assert_nothing_written(out)


def test_image_size_disagrees_with_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    path = _cvat_with(tmp_path, 'name="img_1.png" width="64"', 'name="img_1.png" width="128"')
    assert run_import(path, out) == 2
    assert (f"image img_1.png: the export says 128x48 but {IMAGES / 'img_1.png'} is 64x48; was the image replaced"
            in capsys.readouterr().err)
    assert_nothing_written(out)


def test_exif_rotation_is_compared_upright_and_named(tmp_path, capsys):
    """A phone photo stored 64x48 with EXIF orientation 6 is shown (and trained) 48x64; an export that
    says 64x48 was made by a tool that ignored the rotation, and its coordinates would land turned."""
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(IMAGES / "img_0.png").convert("RGB").save(images / "img_0.jpg", exif=exif)
    csv_ok = tmp_path / "ok.csv"
    csv_ok.write_text("img_0.jpg,40,60,disk\nimg_0.jpg,1,1,background\n")  # upright coordinates: y up to 64
    assert run_import(csv_ok, tmp_path / "ok", images=images) == 0
    assert read_png(tmp_path / "ok" / "train" / "labels" / "img_0.png").shape == (64, 48)
    export = [{"id": 1, "data": {"image": "/data/upload/1/0badcafe-img_0.jpg"}, "annotations": [{"result": [
        {"type": "keypointlabels", "original_width": 64, "original_height": 48, "image_rotation": 0,
         "value": {"x": 50.0, "y": 50.0, "width": 1, "keypointlabels": ["disk"]}},
        {"type": "keypointlabels", "original_width": 64, "original_height": 48, "image_rotation": 0,
         "value": {"x": 5.0, "y": 5.0, "width": 1, "keypointlabels": ["background"]}}]}]}]
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(export))
    out = tmp_path / "out"
    assert run_import(path, out, images=images) == 2
    assert ("image img_0.jpg: the export says 64x48, the file's size as stored, but its EXIF orientation 6 turns it "
            "to 48x64 as shown (and as trained)" in capsys.readouterr().err)
    assert_nothing_written(out)


@pytest.mark.parametrize("content", ["", '<?xml version="1.0"?>\n<annotations><version>1.1</version>'
                                         '<image id="0" name="img_0.png" width="64" height="48"/></annotations>'])
def test_empty_export(tmp_path, capsys, content):
    path = tmp_path / "export.xml"
    path.write_text(content)
    out = tmp_path / "out"
    assert run_import(path, out) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and err.count("\n") == 1
    assert_nothing_written(out)


def test_existing_out_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_import(DATA / "cvat.xml", out) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ---- predictions back to the tools -------------------------------------------------------------------------------

def _full_label():
    """The scene of img_0: background, a disk of radius 9 at (14, 16), a box (34..56, 22..40)."""
    import cv2

    label = np.zeros((48, 64), np.uint8)
    cv2.circle(label, (14, 16), 9, 1, -1)
    cv2.rectangle(label, (34, 22), (56, 40), 2, -1)
    return label


def _shapes_back(export, name):
    image = next(i for i in export.images if i.name == name)
    return rasterize(image.shapes, {n: i for i, n in enumerate(export.labels or CLASSES)}, 48, 64, 0, 1)


@pytest.mark.parametrize("fmt, suffix", [("cvat", "xml"), ("label-studio", "json")])
@pytest.mark.parametrize("shape", ["polygon", "mask"])
def test_preannotations_parse_back_to_the_predicted_map(tmp_path, capsys, fmt, suffix, shape):
    masks = tmp_path / "pred"
    masks.mkdir()
    (masks / "img_0.png").write_bytes(palette_png(_full_label(), ((0, 0, 0), (255, 0, 0), (0, 0, 255))))
    (masks / "img_0_overlay.png").write_bytes(b"not read")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / f"pre.{suffix}"
    argv = ["preannotate", str(masks), "--format", fmt, "--classes", str(classes), "--images", str(IMAGES),
            "--out", str(out), "--shape", shape, "--min-area", "1"]
    assert cli.main(argv) == 0
    assert "wrote 1 image(s) of pre-annotations" in capsys.readouterr().out
    if fmt == "cvat":
        export = cvat.read(out)
    else:
        export = label_studio.read(_predictions_as_annotations(out, tmp_path))
    back = _shapes_back(export, "img_0.png")
    # Polygons keep outer boundaries only: the background's polygon covers the disk and box too, which are drawn
    # over it (regions are written class by class). Masks are exact.
    assert (back == _full_label()).mean() > (0.99 if shape == "polygon" else 0.9999)


def _predictions_as_annotations(path, tmp_path):
    """Label Studio shows imported predictions; once accepted they export as annotations of the same results."""
    tasks = json.loads(path.read_text())
    for task in tasks:
        assert task["predictions"][0]["result"][0]["from_name"] == "label"
        task["annotations"] = task.pop("predictions")
    again = tmp_path / "as_exported.json"
    again.write_text(json.dumps(tasks))
    return again


def test_preannotate_refuses_maps_with_more_classes_than_listed(tmp_path, capsys):
    masks = tmp_path / "pred"
    masks.mkdir()
    (masks / "a.png").write_bytes(palette_png(np.full((8, 8), 5, np.uint8), ((0, 0, 0),) * 6))
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "pre.xml"
    assert cli.main(["preannotate", str(masks), "--format", "cvat", "--classes", str(classes), "--out", str(out)]) == 2
    assert "holds class ids [5] but --classes lists 3 classes" in capsys.readouterr().err
    assert not out.exists()


def test_brush_rle_round_trip():
    mask = np.random.default_rng(0).random((37, 53)) > 0.7
    assert (label_studio.decode_brush_rle(label_studio.encode_brush_rle(mask), 53, 37) == mask).all()
    mask[:] = True  # one run longer than the longest run field: split across chunks
    assert (label_studio.decode_brush_rle(label_studio.encode_brush_rle(mask), 53, 37) == mask).all()


def test_cvat_mask_rle_round_trip():
    mask = np.random.default_rng(1).random((9, 11)) > 0.5
    mask[0, 0] = True  # a mask starting with foreground starts its RLE with an empty background run
    rle = cvat.encode_mask_rle(mask)
    assert rle.startswith("0, ")
    assert (cvat.decode_mask_rle(rle, 11, 9, "test") == mask).all()


# ---- the loop: import, train, predict, pre-annotate ----------------------------------------------------------------

def test_import_train_predict_and_preannotate_end_to_end(tmp_path, capsys):
    """About 20 s on 2 CPU cores: ResNet-18, 2 steps on 64 x 48 images."""
    from agmm_deploy.cli import predict
    from training import run

    data = tmp_path / "data"
    assert run_import(DATA / "cvat.xml", data) == 0
    run.main(["--dataset", "folder", "--data-root", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2",
              "--device", "cpu", "--backbone", "resnet18", "--batch-size", "2", "--crop-size", "64", "--workers", "0"])
    checkpoint = tmp_path / "run" / "last.pt"
    assert checkpoint.is_file()
    assert predict.main([str(checkpoint), str(IMAGES), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    for fmt, suffix, reader in (("cvat", "xml", cvat.read), ("label-studio", "json", None)):
        out = tmp_path / f"pre.{suffix}"
        assert cli.main(["preannotate", str(tmp_path / "pred"), "--format", fmt, "--classes",
                         str(data / "classes.txt"), "--images", str(IMAGES), "--out", str(out), "--min-area", "1"]) == 0
        export = reader(out) if reader else label_studio.read(_predictions_as_annotations(out, tmp_path))
        assert sorted(i.name for i in export.images) == [f"img_{k}.png" for k in range(4)]
        for image in export.images:  # two steps from random weights predict something: every pixel is covered
            back = rasterize(image.shapes, {n: i for i, n in enumerate(CLASSES)}, 48, 64, 0, 1)
            assert image.shapes and (back != IGNORE_INDEX).mean() > 0.95


# ---- annotation files are third-party input (issue 21): names that escape --images, bombs, malformed values ----

def _exports_naming(tmp_path, name):
    """The same click, on an image called ``name``, in each of the four formats."""
    cvat_xml = tmp_path / "a.xml"
    cvat_xml.write_text(f'<annotations><meta><task><labels><label><name>disk</name></label><label><name>box</name>'
                        f'</label></labels></task></meta><image id="0" name="{name}">'
                        f'<points label="disk" points="1,1"/></image></annotations>')
    ls = tmp_path / "a.json"
    ls.write_text(json.dumps([{"data": {"image": f"/data/local-files/?d={name}"}, "annotations": [{"result": [
        {"type": "keypointlabels", "original_width": 64, "original_height": 48,
         "value": {"x": 1, "y": 1, "keypointlabels": ["disk"]}}]}]}]))
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": name}], "categories": [{"id": 1, "name": "disk"},
                                {"id": 2, "name": "box"}], "annotations": [{"image_id": 1, "category_id": 1,
                                                                             "keypoints": [1, 1, 2]}]}))
    csv = tmp_path / "a.csv"
    csv.write_text(f"{name},1,1,disk\n{name},2,2,box\n")
    return [(cvat_xml, "cvat"), (ls, "label-studio"), (coco, "coco"), (csv, "csv")]


@pytest.mark.parametrize("target", ["exists", "absent"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "upload-url"])
def test_image_names_outside_images_are_refused_unopened_with_one_sentence(tmp_path, capsys, monkeypatch, how,
                                                                          target):
    images = tmp_path / "images"
    shutil.copytree(IMAGES, images)
    outside = tmp_path / ("secret.png" if target == "exists" else "absent.png")
    if target == "exists":
        shutil.copyfile(IMAGES / "img_0.png", outside)
    names = {"dotdot": f"../{outside.name}", "absolute": str(outside), "symlink": "link.png",
             "upload-url": None}
    if how == "symlink":
        (images / "link.png").symlink_to(outside)
    opened = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self) or real_read_bytes(self))
    if how == "upload-url":  # Label Studio's upload path, its name percent-encoded with a '../' inside
        path = tmp_path / "ls.json"
        click = {"type": "keypointlabels", "original_width": 64, "original_height": 48,
                 "value": {"x": 1, "y": 1, "keypointlabels": ["disk"]}}
        path.write_text(json.dumps([{"data": {"image": f"/data/upload/1/0badcafe-..%2F{outside.name}"},
                                     "annotations": [{"result": [click]}]}]))
        exports, shown = [(path, "label-studio")], f"../{outside.name}"
    else:
        exports, shown = _exports_naming(tmp_path, names[how]), names[how]
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    for export, fmt in exports:
        out = tmp_path / f"out_{fmt}"
        assert run_import(export, out, "--format", fmt, "--classes", str(classes), images=images) == 2, fmt
        err = capsys.readouterr().err
        assert (f"image {shown!r} of the export names a file outside --images {images}; refused without opening "
                "it" in err), (fmt, err)
        assert "Traceback" not in err and "exist" not in err.replace("not in", "")
        assert_nothing_written(out)
    assert not [p for p in opened if not p.resolve().is_relative_to(tmp_path / "images")], opened


def test_a_cvat_mask_of_a_few_bytes_is_sized_from_its_image_before_decoding(tmp_path, capsys):
    path = _cvat_with(tmp_path, '<image id="0" name="img_0.png" width="64" height="48">',
                      '<image id="0" name="img_0.png" width="64" height="48"><mask label="disk" rle="0, 10000000000" '
                      'left="0" top="0" width="100000" height="100000"/>')
    out = tmp_path / "out"
    assert run_import(path, out) == 2
    err = capsys.readouterr().err
    assert "spans x 0..100000, y 0..100000, outside its 64x48 image; refused before decoding its rle" in err
    huge = _cvat_with(tmp_path, 'name="img_0.png" width="64" height="48"', 'name="img_0.png" width="100000" '
                      'height="100000"')
    assert run_import(huge, out) == 2
    assert "declares an image of 100000x100000 = 10000000000 pixels; the limit is 64000000" in capsys.readouterr().err
    assert_nothing_written(out)


def _ls_brush(tmp_path, rle, width=64, height=48):
    path = tmp_path / "brush.json"
    path.write_text(json.dumps([{"id": 7, "data": {"image": "img_0.png"}, "annotations": [{"result": [
        {"type": "brushlabels", "original_width": width, "original_height": height,
         "value": {"format": "rle", "rle": rle, "brushlabels": ["disk"]}}]}]}]))
    return path


@pytest.mark.parametrize("case", ["header", "length", "declared", "ends", "chunks"])
def test_brush_rle_is_bounded_by_its_declared_size(tmp_path, capsys, monkeypatch, case):
    good = label_studio.encode_brush_rle(np.ones((48, 64), bool))
    header_of = lambda num: list(num.to_bytes(4, "big"))  # noqa: E731  (the value count: the first 32 bits)
    rle, width, height, expected = {
        # a header asking for far more values than the declared 64x48 RGBA (the 7.45 GiB one)
        "header": (header_of(2_000_000_000) + good[4:], 64, 48, "holds 2000000000 values; the image's 64x48 RGBA "
                   "needs 12288"),
        # a stream longer than any 64x48 mask needs (the 200 MB one, small)
        "length": (good + [0] * 60_000, 64, 48, "brush rle holds 60010 bytes; a 64x48 mask needs at most 49160"),
        "declared": (good, 100_000, 100_000, "declares an image of 100000x100000 = 10000000000 pixels"),
        "ends": (good[:9], 64, 48, "brush rle ends early"),
        # every run of the mask costs a chunk; over the bound (here lowered to 100) it is refused, not decoded
        "chunks": (label_studio.encode_brush_rle(np.tile([[True, False]], (48, 32))), 64, 48,
                   "brush rle needs more than 100 chunks for its 64x48 mask"),
    }[case]
    monkeypatch.setattr(label_studio, "MAX_BRUSH_CHUNKS", 100)
    path = _ls_brush(tmp_path, rle, width, height)
    out = tmp_path / "out"
    assert run_import(path, out, "--format", "label-studio") == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err and "Traceback" not in err, err
    assert_nothing_written(out)


_LS_POINT = {"type": "keypointlabels", "original_width": 64, "original_height": 48,
             "value": {"x": 10, "y": 10, "keypointlabels": ["disk"]}}
_COCO = {"images": [{"id": 1, "file_name": "img_0.png", "width": 64, "height": 48}],
         "categories": [{"id": 1, "name": "disk"}, {"id": 2, "name": "box"}],
         "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "keypoints": [10, 10, 2]}]}


def _with(base, path, value):
    """A deep copy of ``base`` with the item at ``path`` (a tuple of keys) replaced, or deleted for ``...``."""
    data = json.loads(json.dumps(base))
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


def _ls(result):
    return [{"id": 3, "data": {"image": "img_0.png"}, "annotations": [{"result": [result]}]}]


_MALFORMED = {
    "cvat-nan-point": ("xml", ('points="14.50,16.50"', 'points="NaN,16.50"'),
                       "has points='NaN,16.50'; expected finite"),
    "cvat-infinity-point": ("xml", ('points="14.50,16.50"', 'points="14.5,Infinity"'), "expected finite numbers"),
    "cvat-abc-width": ("xml", ('name="img_0.png" width="64"', 'name="img_0.png" width="abc"'),
                       "image 'img_0.png' has width='abc'; expected a number"),
    "cvat-inf-mask-left": ("xml", ('left="0" top="0"', 'left="inf" top="0"'),
                           "has left='inf'; expected a finite number"),
    "ls-nan-x": ("json", _ls(_with(_LS_POINT, ("value", "x"), float("nan"))), "has x=nan; expected a finite number"),
    "ls-abc-width": ("json", _ls(_with(_LS_POINT, ("original_width",), "abc")), "has width='abc'; expected a number"),
    "ls-task-not-object": ("json", [["not", "a", "task"]], "task 1 has the task of type list; expected a JSON object"),
    "ls-annotations-string": ("json", [{"data": {"image": "a.png"}, "annotations": "x"}],
                              "has annotations of type str; expected a JSON list"),
    "ls-label-not-list": ("json", _ls(_with(_LS_POINT, ("value", "keypointlabels"), "disk")),
                          "has value.keypointlabels that is not a list of label names"),
    "coco-image-without-file-name": ("json", _with(_COCO, ("images", 0, "file_name"), ...),
                                     "images[0] lacks file_name; a COCO entry there has id, file_name"),
    "coco-category-without-name": ("json", _with(_COCO, ("categories", 0, "name"), ...),
                                   "categories[0] lacks name"),
    "coco-annotation-without-image-id": ("json", _with(_COCO, ("annotations", 0, "image_id"), ...),
                                         "annotations[0] lacks image_id"),
    "coco-abc-keypoint": ("json", _with(_COCO, ("annotations", 0, "keypoints"), ["abc", 1, 2]),
                          "annotation 5 has keypoints='abc'; expected a number"),
    "coco-infinity-keypoint": ("json", _with(_COCO, ("annotations", 0, "keypoints"), [float("inf"), 1, 2]),
                               "annotation 5 has keypoints=inf; expected a finite number"),
    "coco-keypoints-not-triples": ("json", _with(_COCO, ("annotations", 0, "keypoints"), [1, 2]),
                                   "has keypoints that is not a flat list of numbers in groups of 3"),
    "coco-abc-height": ("json", _with(_COCO, ("images", 0, "height"), "abc"), "has height='abc'; expected a number"),
    "coco-not-an-object": ("json", [1, 2], None),  # a list is read as Label Studio: forced to coco below
    "deep-json": ("json", None, "nests JSON lists or objects deeper than the parser goes"),
    "csv-abc": ("csv", "img_0.png,abc,1,disk\nimg_0.png,1,1,box\n", "row 1 has x='abc'; expected a number"),
    "csv-nan": ("csv", "img_0.png,nan,1,disk\nimg_0.png,1,1,box\n", "row 1 has x='nan'; expected a finite number"),
    "csv-131k-field": ("csv", "img_0.png,1,1," + "d" * 131_073 + "\n", "is not a readable CSV (field larger than"),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_every_malformed_value_is_one_sentence_naming_the_file_and_field(tmp_path, capsys, case):
    kind, content, expected = _MALFORMED[case]
    fmt = {"xml": "cvat", "csv": "csv"}.get(kind, "coco" if case.startswith(("coco", "deep")) else "label-studio")
    path = tmp_path / f"export.{kind}"
    if kind == "xml":
        path = _cvat_with(tmp_path, *content)
    elif case == "deep-json":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "json":
        path.write_text(json.dumps(content))  # Python writes NaN / Infinity, as some exporters do
    else:
        path.write_text(content)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "out"
    assert run_import(path, out, "--format", fmt, "--classes", str(classes)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(path) in err and err.count("\n") == 1, err
    assert expected is None or expected in err, err
    assert_nothing_written(out)


def test_many_shapes_cost_their_own_size_not_the_image_s():
    """Each shape is drawn in its own box: 2,000 clicks on a 4000x3000 image took 50 s when each filled a canvas
    of the image's size (0.2 s now). Shapes at the border are still drawn as on the whole image."""
    from agmm_deploy.labels.annotations import Shape

    ids = {n: i for i, n in enumerate(CLASSES)}
    corner = rasterize([Shape("point", "disk", np.array([[64.0, 48.0]]))], ids, 48, 64, 2, 3)
    assert corner[47, 63] == DISK and corner[45, 63] == DISK and corner[47, 61] == DISK and (corner == DISK).sum() == 6
    line = rasterize([Shape("polyline", "box", np.array([[0.5, 0.5], [63.5, 0.5]]))], ids, 48, 64, 2, 3)
    assert (line[0:2, 1:63] == BOX).all() and (line[3:] == IGNORE_INDEX).all()  # 3 wide, cut by the top border
    rng = np.random.default_rng(0)
    clicks = [Shape("point", "disk", rng.uniform([0, 0], [4000, 3000], (1, 2))) for _ in range(2000)]
    assert (rasterize(clicks, ids, 3000, 4000, 2, 3) == DISK).sum() > 2000 * 10
