"""`make demo`: the main job end to end, every step the real command a user would run, printed first.

    generate a synthetic Cityscapes-layout data set with 20-click labels  (python -m training.synthetic)
    train DeepLabV3+ ResNet-18 with the AGMM loss                          (python -m training.run)
    evaluate it with a sliding window                                      (python -m training.evaluate)
    export it to ONNX with a parity check against PyTorch                  (agmm-export)
    serve it with BentoML and segment a real image over HTTP               (bentoml serve, curl)

Usage: python scripts/demo.py [--out runs/demo] [--quick]
``--quick`` shrinks every step (tiny images, a few training steps) so the test suite can run the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from serving.launch import free_port, serve_command, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# (full, quick) sizes. Full: 10-15 minutes on 2 CPU cores (250 training steps), set-up excluded.
SIZES = {
    "full": dict(height=192, width=384, num_train=100, num_val=10, crop=192, batch=4, epochs=10, max_steps=0),
    "quick": dict(height=64, width=128, num_train=6, num_val=2, crop=64, batch=2, epochs=1, max_steps=3),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train, evaluate, export and serve on generated data")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for everything the demo writes")
    parser.add_argument("--quick", action="store_true", help="minimum sizes (for tests): a few training steps")
    parser.add_argument("--port", type=int, default=0, help="port for bentoml serve (default: a free one)")
    return parser


def _display(cmd: list[str]) -> str:
    """The command as a user would type it: venv executables by their short names."""
    shown = []
    for part in cmd:
        if part == sys.executable:
            part = "python"
        elif part.startswith(str(BIN) + os.sep):
            part = Path(part).name
        shown.append(part)
    return shlex.join(shown)


def step(title: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
    print(f"\n=== {title}\n$ {_display(cmd)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"demo step failed ({title}): `{_display(cmd)}` exited with {result.returncode}")
    print(f"--- done in {time.perf_counter() - start:.0f}s", flush=True)


def _parity_folder(data: Path, out: Path) -> Path:
    """agmm-export takes DIR/images + DIR/labels/<stem>.png: link the generated val images and full labels."""
    images, labels = out / "images", out / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for image in sorted((data / "leftImg8bit" / "val").rglob("*_leftImg8bit.png")):
        stem = image.name.removesuffix("_leftImg8bit.png")
        label = data / "gtFine" / "val" / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        shutil.copyfile(image, images / f"{stem}.png")
        shutil.copyfile(label, labels / f"{stem}.png")
    return out


def _calibration_folder(data: Path, out: Path, count: int) -> Path:
    """int8 calibration takes a flat folder of images: copy the first ``count`` training images."""
    out.mkdir(parents=True, exist_ok=True)
    for image in sorted((data / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))[:count]:
        shutil.copyfile(image, out / image.name)
    return out


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    os.chdir(ROOT)  # commands run from the project root, so relative paths print as a user would type them
    out = args.out
    if out.exists():
        shutil.rmtree(out)  # a demo starts from nothing; it only ever writes inside --out
    data, train, evaluation, export, served = (out / n for n in ("data", "train", "eval", "export", "served"))
    py = sys.executable
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    start = time.perf_counter()

    step("1/6 Generate a synthetic Cityscapes-layout data set with 20-click sparse labels",
         [py, "-m", "training.synthetic", "--dataset", "cityscapes", "--out", str(data),
          "--num-train", str(size["num_train"]), "--num-val", str(size["num_val"]),
          "--height", str(size["height"]), "--width", str(size["width"]), "--seed", "0"])

    train_cmd = [py, "-m", "training.run", "--dataset", "cityscapes", "--clicks", "20", "--data-root", str(data),
                 "--pretrained", "none", "--backbone", "resnet18", "--crop-size", str(size["crop"]), "--batch-size", str(size["batch"]),
                 "--epochs", str(size["epochs"]), "--lr", "0.01", "--workers", "0", "--eval-mode", "center",
                 "--out", str(train)]
    if size["max_steps"]:
        train_cmd += ["--max-steps", str(size["max_steps"])]
    step("2/6 Train DeepLabV3+ ResNet-18 with the AGMM loss on the 20-click labels", train_cmd)
    checkpoint = train / "best.pt"

    step("3/6 Evaluate on the full validation labels (sliding window, per-class IoU)",
         [py, "-m", "training.evaluate", str(checkpoint), "--data-root", str(data), "--mode", "sliding",
          "--save-png", str(evaluation / "predictions"), "--json", str(evaluation / "miou.json")])

    parity = _parity_folder(data, out / "parity")
    # Beside fp32, the fastest reduced precision a CPU runs: int8 (OpenVINO + NNCF, calibrated on training
    # images); both rows land in one parity table. bf16 would be slower where it runs at all.
    step("4/6 Export to ONNX (fp32 and int8) and check parity with PyTorch on the labelled validation images",
         [str(BIN / "agmm-export"), str(checkpoint), "--out", str(export), "--parity-images", str(parity),
          "--parity-count", str(size["num_val"]), "--precision", "int8",
          "--calib-images", str(_calibration_folder(data, out / "calib", size["num_val"]))])
    onnx_path = export / "model.onnx"

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    served.mkdir(parents=True, exist_ok=True)
    print(f"\n=== 5/6 Serve the ONNX model over HTTP with BentoML\n"
          f"$ AGMM_MODEL={onnx_path} {_display(serve_command(port))} &", flush=True)
    log = served / "serve.log"
    try:
        server = start_server(port, log, {**env, "AGMM_MODEL": str(onnx_path)})
    except RuntimeError as err:
        raise SystemExit(f"demo step failed (bentoml serve): {err}") from None
    print(f"--- ready at {url} (log: {log})", flush=True)
    try:
        image = next((parity / "images").glob("*.png"))
        print("\n=== 6/6 Segment a real image over HTTP", flush=True)
        requests = [("segment", served / "mask.png"), ("overlay", served / "overlay.png"),
                    ("segment_json", served / "fractions.json")]
        for route, target in requests:
            cmd = ["curl", "-sS", "--fail-with-body", "-F", f"image=@{image}", f"{url}/{route}", "-o", str(target)]
            if shutil.which("curl"):
                step(f"POST /{route}", cmd)
            else:  # same request without curl
                print(f"$ {_display(cmd)}  (curl not installed: sent with urllib)")
                _post_file(f"{url}/{route}", image, target)
        fractions = json.loads((served / "fractions.json").read_text())
        present = {name: round(v, 4) for name, v in fractions["fractions"].items() if v > 0}
        print(f"pixel fractions of {image.name} (classes present): {present}")
        comparison = _comparison(image, parity / "labels" / image.name, served / "mask.png",
                                 served / "overlay.png", served / "comparison.png")
        print(f"wrote {comparison}: image | ground truth | served mask | served overlay")
    finally:
        stop_server(server)
        print("--- server stopped", flush=True)

    print(f"\nDemo finished in {time.perf_counter() - start:.0f}s. Everything is under {out}:")
    for label, path in [("data set", data), ("checkpoints + TensorBoard logs", train),
                        ("evaluation (mIoU JSON, prediction PNGs)", evaluation),
                        ("ONNX model + parity.json", export), ("served mask / overlay / JSON", served)]:
        print(f"  {label:42s} {path}")
    return 0


def _comparison(image: Path, label: Path, mask: Path, overlay: Path, target: Path) -> Path:
    """One picture to look at: the input, its full label and what the server answered, side by side."""
    import numpy as np
    from PIL import Image

    served_mask = Image.open(mask)  # indexed PNG: the model's palette travels with it (255 = ignore: black)
    truth = Image.fromarray(np.asarray(Image.open(label), dtype=np.uint8), mode="P")
    truth.putpalette(served_mask.getpalette())
    tiles = [Image.open(image).convert("RGB"), truth.convert("RGB"), served_mask.convert("RGB"),
             Image.open(overlay).convert("RGB")]
    width, height = tiles[0].size
    sheet = Image.new("RGB", (width * len(tiles) + 4 * (len(tiles) - 1), height), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * (width + 4), 0))
    sheet.save(target)
    return target


def _post_file(url: str, image: Path, target: Path) -> None:
    boundary = "agmm-demo-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{image.name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        target.write_bytes(response.read())


if __name__ == "__main__":
    sys.exit(main())
