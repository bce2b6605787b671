"""`make demo` at minimum size: the same script, every real command, a few training steps (CI keeps it working)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "scripts/demo.py", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Every step is printed as the command a user would type, before it runs.
    for command in ["$ python -m training.synthetic", "$ python -m training.run --dataset cityscapes --clicks 20",
                    "$ python -m training.evaluate", "$ agmm-export", "python -m bentoml serve", "$ curl"]:
        assert command in result.stdout

    assert (out / "train" / "best.pt").is_file() and (out / "train" / "last.pt").is_file()
    def strict_json(c):  # NaN/Infinity are not JSON; other tools reject them
        raise AssertionError(f"miou.json holds {c}")

    miou = json.loads((out / "eval" / "miou.json").read_text(), parse_constant=strict_json)
    assert 0.0 <= miou["miou"] <= 100.0 and len(miou["iou"]) == 19
    parity = json.loads((out / "export" / "parity.json").read_text())
    assert parity["passed"] and parity["labelled"]
    assert [b["precision"] for b in parity["backends"]] == ["fp32", "int8"]  # both rows of one parity table

    image = Image.open(next((out / "parity" / "images").glob("*.png")))
    mask = Image.open(out / "served" / "mask.png")
    assert mask.size == image.size and mask.mode == "P"
    assert int(np.asarray(mask).max()) < 19
    assert Image.open(out / "served" / "overlay.png").size == image.size
    assert Image.open(out / "served" / "comparison.png").size == (4 * image.size[0] + 12, image.size[1])
    fractions = json.loads((out / "served" / "fractions.json").read_text())
    assert abs(sum(fractions["fractions"].values()) - 1.0) < 1e-6
