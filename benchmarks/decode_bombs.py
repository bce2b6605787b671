"""Time and peak memory to refuse (or decode) the hostile images and annotation files of issue 21, each case in
a fresh process so its peak RSS is its own.

    python benchmarks/decode_bombs.py            # a table: case, seconds, peak RSS (MiB) of the case's process
"""

from __future__ import annotations

import io
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def scan_bomb(scans: int, size: int = 2896) -> bytes:
    """A size x size progressive JPEG whose smallest refinement scan is repeated until it has ``scans`` scans."""
    from PIL import Image

    # A flat colour: its refinement scans are a few dozen bytes (10,000 scans ~ 300 KB, as in the 236 KB).
    image = Image.new("RGB", (size, size), (120, 130, 140))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", progressive=True, quality=80)
    data = buffer.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    bounds = list(zip(starts, starts[1:] + [len(data) - 2]))
    first, end = min(bounds[1:], key=lambda b: b[1] - b[0])  # the smallest scan after the first
    return data[:end] + data[first:end] * (scans - len(starts)) + data[end:]


def sixteen_bit_png() -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.arange(4096 * 2048) % 65536).astype(np.uint16).reshape(2048, 4096)).save(buffer, "PNG")
    return buffer.getvalue()


def ico_hiding_png(side: int = 9000) -> bytes:
    rows = zlib.compress(b"".join(b"\0" + b"\0" * side * 3 for _ in range(side)), 9)
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
           + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)  # the directory says 256x256
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def run_case(case: str, folder: Path) -> str:
    """Runs one case in this process (the modules already imported); returns what happened."""
    from agmm_deploy.decode import ImageDecodeError, decode_image

    data_path = folder / case
    if case.startswith("labels-"):
        from agmm_deploy.cli.labels import main

        images = folder / "images"
        code = main(["import", str(data_path), "--images", str(images), "--out", str(folder / f"out-{case}"),
                     "--classes", str(folder / "classes.txt")])
        return f"agmm-labels exit {code}"
    data = data_path.read_bytes()
    if case.endswith("-before"):  # what decode_image did before issue 21: Pillow, then a float64 16-bit path
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode.startswith("I"):
                array = np.asarray(image, dtype=np.float64)
                lo, hi = float(array.min()), float(array.max())
                gray = np.clip(np.rint((array - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
                return f"decoded {np.repeat(gray[:, :, None], 3, axis=2).shape} as before"
            return f"decoded {np.asarray(image.convert('RGB')).shape} as before"
    try:
        return f"decoded {decode_image(data, max_pixels=8 << 20, name=case).shape}"
    except ImageDecodeError as err:
        return f"refused: {str(err)[:90]}"


def prepare(folder: Path) -> list[str]:
    import numpy as np
    from PIL import Image

    from agmm_deploy.labels.label_studio import encode_brush_rle

    cases = {"jpeg-10000-scans": scan_bomb(10_000), "jpeg-1000-scans-before": scan_bomb(1_000),
             "jpeg-16-scans": scan_bomb(16), "jpeg-17-scans": scan_bomb(17),
             "png-16bit-4096x2048": sixteen_bit_png(),
             "png-16bit-4096x2048-before": sixteen_bit_png(), "ico-256-holding-9000x9000": ico_hiding_png()}
    for name, data in cases.items():
        (folder / name).write_bytes(data)
    images = folder / "images"
    images.mkdir()
    Image.new("RGB", (64, 48)).save(images / "a.png")
    (folder / "classes.txt").write_text("background\ndisk\n")
    (folder / "labels-cvat-mask").write_text(
        '<annotations><image name="a.png" width="64" height="48"><mask label="disk" rle="0, 10000000000" left="0" '
        'top="0" width="100000" height="100000"/></image></annotations>')
    brush = encode_brush_rle(np.tile([[True, False]], (48, 32)))
    brush += [0] * (946_000 - len(brush))  # a 946 KB stream for a 64x48 mask
    (folder / "labels-ls-brush").write_text(json.dumps([{"data": {"image": "a.png"}, "annotations": [{"result": [
        {"type": "brushlabels", "original_width": 64, "original_height": 48,
         "value": {"format": "rle", "rle": brush, "brushlabels": ["disk"]}}]}]}]))
    return [*cases, "labels-cvat-mask", "labels-ls-brush"]


def _peak_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    if len(sys.argv) == 3:  # one case, in its own process
        import numpy  # noqa: F401  (imports are not the case's cost)
        import PIL.Image  # noqa: F401

        import agmm_deploy.cli.labels  # noqa: F401
        import agmm_deploy.decode  # noqa: F401

        before = _peak_mib()
        start = time.perf_counter()
        outcome = run_case(sys.argv[1], Path(sys.argv[2]))
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "peak_mib": _peak_mib(), "growth_mib": _peak_mib() - before,
                          "outcome": outcome}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"{'case':<30} {'bytes':>9} {'seconds':>8} {'peak MiB':>9} {'+MiB':>6}  outcome")
        for case in prepare(folder):
            done = subprocess.run([sys.executable, __file__, case, str(folder)], capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
            if row is None:
                print(f"{case:<30} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            print(f"{case:<30} {(folder / case).stat().st_size:>9} {row['seconds']:>8.3f} {row['peak_mib']:>9.0f} {row['growth_mib']:>6.0f}  "
                  f"{row['outcome']}")


if __name__ == "__main__":
    main()
