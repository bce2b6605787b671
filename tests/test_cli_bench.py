import pytest
import torch

from agmm_deploy.checkpoint import save_checkpoint
from agmm_deploy.cli.bench import count_flops, format_table, main, measure_gemm_gflops, Row
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
    assert all(float(r[8]) > 0 for r in rows)  # achieved GFLOP/s
    flops = count_flops(config.to_dict(), 64, 64)
    assert f"{flops / 1e9:.1f} GFLOP per image" in out and "measured fp32 GEMM cpu" in out


def test_flops_of_the_paper_model_match_the_spec():
    # docs/algorithm.md: DeepLabV3+ R50 at 512x1024 is 0.76 TFLOP; counted on the meta device, no memory used.
    assert count_flops(ModelConfig.cityscapes().to_dict(), 512, 1024) / 1e12 == pytest.approx(0.76, abs=0.01)


def test_table_ratio_and_gemm_share():
    rows = [Row("pytorch", "pt", "fp32", 1, 100.0, 110.0, 5, runtime="pytorch"),
            Row("onnxruntime-cpu", "onnx", "fp32", 1, 50.0, 60.0, 5, runtime="onnxruntime")]
    table = format_table(rows, flops=1e9, gemm={"cpu": 40.0})
    eager, ort = table.splitlines()[2:]
    assert "1.00x" in eager and "2.00x" in ort
    assert ort.split()[-2:] == ["20.0", "50%"]  # 1 GFLOP / 50 ms = 20 GFLOP/s = 50 % of a 40 GFLOP/s GEMM
    rates = measure_gemm_gflops(n=256, repeats=2)
    assert set(rates) == {"torch", "numpy", "onnxruntime"} and min(rates.values()) > 0
