import pytest
import torch

from agmm_deploy.checkpoint import save_checkpoint
from agmm_deploy.cli.bench import (Row, count_flops, floor_precision, format_table, gpu_peak_gflops, main,
                                   measure_cpu_gemm_rates, measure_gemm_gflops)
from agmm_deploy.contract import ModelMeta
from agmm_deploy.model import DeepLabV3Plus, ModelConfig


def test_checkpoint_alone_compares_eager_with_onnxruntime(tmp_path, capsys):
    torch.manual_seed(0)
    config = ModelConfig(backbone="resnet18", num_classes=19)
    ckpt = save_checkpoint(tmp_path / "tiny.pt", DeepLabV3Plus(config).eval(),
                           ModelMeta.for_dataset("cityscapes", (64, 64)))
    assert main([str(ckpt), "--batch", "1", "2", "--iters", "3", "--device", "cpu", "--gemm-size", "512"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Backend"))
    rows = [line.split() for line in lines[header + 2:header + 6]]
    assert [(r[0], r[3]) for r in rows] == [("pytorch", "1"), ("onnxruntime-cpu", "1"),
                                            ("pytorch", "2"), ("onnxruntime-cpu", "2")]
    assert rows[0][7] == "1.00x" and rows[1][7].endswith("x") and float(rows[1][7][:-1]) > 0
    assert all(r[2] == "fp32" and float(r[4]) > 0 and float(r[5]) > 0 for r in rows)  # compute, end to end
    assert all(float(r[8]) > 0 and r[9].endswith("%") for r in rows)  # fp32 floor from the measured GEMM
    flops = count_flops(config.to_dict(), 64, 64)
    assert f"{flops / 1e9:.1f} GFLOP per image" in out
    assert all(f"floor rate cpu {p}:" in out for p in ("fp32", "bf16", "int8"))


def test_flops_of_the_paper_model_match_the_spec():
    # docs/algorithm.md: DeepLabV3+ R50 at 512x1024 is 0.76 TFLOP; counted on the meta device, no memory used.
    assert count_flops(ModelConfig.cityscapes().to_dict(), 512, 1024) / 1e12 == pytest.approx(0.76, abs=0.01)


def test_table_ratios_floors_and_rates():
    rows = [Row("pytorch", "pt", "fp32", 1, 100.0, 110.0, 5, runtime="pytorch", e2e_ms=120.0),
            Row("onnxruntime-cpu", "onnx", "fp32", 1, 50.0, 60.0, 5, runtime="onnxruntime", e2e_ms=55.0),
            Row("openvino-cpu", "xml", "int8", 1, 25.0, 30.0, 5, runtime="openvino", e2e_ms=30.0,
                precision_used="int8,rest=f32", miou_delta=-0.25)]
    rates = {("cpu", "fp32"): (40.0, "test"), ("cpu", "int8"): (160.0, "test")}
    eager, ort, ov = format_table(rows, flops=1e9, rates=rates).splitlines()[2:]
    assert "1.00x" in eager and "2.00x" in ort and "4.00x" in ov
    # 1 GFLOP at 40 GFLOP/s = 25 ms, 50 % of ORT's 50 ms; int8 at 160 GFLOP/s = 6.25 ms, 25 % of 25 ms.
    assert ort.split()[-4:] == ["2.00x", "25.0", "50%", "-"] and ov.split()[-4:] == ["4.00x", "6.2", "25%", "-0.25"]
    assert ov.split()[2] == "int8,rest=f32" and ov.split()[5:7] == ["30.0", "33.33"]  # e2e, img/s from e2e
    # Against ONNX Runtime fp32 instead of eager.
    assert format_table(rows, flops=1e9, rates=rates, baseline="onnxruntime").splitlines()[4].split()[7] == "2.00x"
    rates = measure_gemm_gflops(n=256, repeats=2)
    assert set(rates) == {"torch", "numpy", "onnxruntime"} and min(rates.values()) > 0
    low = measure_cpu_gemm_rates(n=256, seconds=0.1)
    assert low["bf16"]["torch"] > 0 and low["int8"]["onnxruntime"] > 0


def test_gpu_floors_come_from_the_known_peaks():
    assert gpu_peak_gflops("NVIDIA H200", "bf16") == 989e3 and gpu_peak_gflops("NVIDIA H100 PCIe", "fp16") == 756e3
    assert gpu_peak_gflops("NVIDIA H100 80GB HBM3", "tf32") == 494.5e3
    assert gpu_peak_gflops("NVIDIA H100 80GB HBM3", "fp32") is None and gpu_peak_gflops("Mystery GPU", "bf16") is None
    on = Row("pytorch-cuda", "pt", "fp32", 1, 1.0, 1.0, 1, device="cuda", precision_used="fp32,tf32=on")
    off = Row("pytorch-cuda", "pt", "fp32", 1, 1.0, 1.0, 1, device="cuda", precision_used="fp32,tf32=off")
    assert (floor_precision(on), floor_precision(off)) == ("tf32", "fp32")


def test_timing_check_times_one_runner_both_ways_and_splits_end_to_end(capsys):
    # benchmarks/bench_timing_check.py on a tiny ONNX model: agmm-bench's functions and the direct loop both ran
    # on the same runner; PASS or FAIL is a timing, so only that a verdict was given is asserted.
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_timing_check.py"
    spec = importlib.util.spec_from_file_location("bench_timing_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    code = check.main(["--backbone", "resnet18", "--height", "32", "--width", "64", "--device", "cpu",
                       "--iters", "3", "--samples", "3"])
    out = capsys.readouterr().out
    assert code in (0, 1) and "direct: session.run" in out
    fresh, steady = (line for line in out.splitlines() if line.startswith("compute,"))
    assert "3 calls" in fresh and "3 agmm-bench samples interleaved with 3 direct calls" in steady
    assert all(re.search(r"\d\.\d{3} (PASS|FAIL)", line) for line in (fresh, steady))  # ratio and verdict
    assert "upload + normalise" in out and "run on it (channels_last)" in out and "argmax + download" in out
