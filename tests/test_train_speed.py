"""benchmarks/train_speed.py at a tiny size on the CPU: every row of its table is there (no timing asserted)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_speed", REPO / "benchmarks" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_speed"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_prints_every_row_with_ratios(capsys):
    table = load_benchmark().main(["--device", "cpu", "--size", "33", "--batch", "2", "--backbone", "resnet18",
                                   "--steps", "1", "--warmup", "0", "--loader-images", "2", "--image-size", "48",
                                   "96", "--workers", "0"])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"official", "ours fp32", "loader (0 workers)"}  # on the CPU the defaults are ours fp32
    assert rows["official"].split("|")[4].strip() == "1.00x"
    ratio = float(rows["ours fp32"].split("|")[4].strip().rstrip("x"))
    share = float(rows["ours fp32"].split("|")[6].strip().rstrip(" %"))
    assert ratio > 0 and 0 < share < 100
    assert "ours fp32's images/s" in rows["loader (0 workers)"]
    assert table in capsys.readouterr().out
