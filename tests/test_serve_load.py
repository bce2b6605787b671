"""benchmarks/serve_load.py: each traffic for a few seconds against a real `bentoml serve` of a tiny model.

The assertions are on the LoadResult that main() returns, never on timings (shared machines are noisy) and never
on how well the server does: the benchmark's job is to measure and classify, whatever the server answers.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from agmm_deploy.contract import ModelMeta
from agmm_deploy.export.onnx import export_onnx
from agmm_deploy.model import ModelConfig, build_model
from agmm_deploy.transforms import decode_image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is run from the source tree, not installed

from benchmarks import serve_load, serve_traffic  # noqa: E402
from benchmarks.serve_traffic import BAD, CLIENT, GOOD, ODD  # noqa: E402

SIZE = 64
SHORT = ["--clients", "3", "--warmup", "1", "--timeout", "30", "--settle", "15"]
OUTCOMES = {serve_traffic.TIMEOUT, serve_traffic.CONN_ERROR, serve_traffic.DROPPED, serve_traffic.HELD}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig.pascal(backbone="resnet18", stem="torchvision", output_stride=16))
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_onnx(model, ModelMeta.for_dataset("pascal", (SIZE, SIZE)), path, height=SIZE, width=SIZE)
    return path


def _check_counts(result: serve_load.LoadResult) -> None:
    """Every request is counted once, under its kind, with an HTTP status or a named outcome."""
    table = result.statuses()
    assert sum(sum(c.values()) for c in table.values()) == len(result.samples) > 0
    assert table == {kind: Counter(s.status for s in result.samples if s.kind == kind) for kind in table}
    for sample in result.samples:
        assert isinstance(sample.status, int) or sample.status in OUTCOMES, sample
        assert sample.expect in (GOOD, BAD, ODD, CLIENT)
        assert sample.latency >= 0 and sample.start >= 0


def test_model_size_traffic(tiny_model, tmp_path, capsys):
    result = serve_load.main(["--model", str(tiny_model), *SHORT, "--duration", "4", "--rounds", "2",
                              "--raw-seconds", "0.5", "--plot", str(tmp_path / "load.png")])
    _check_counts(result)
    assert {s.kind for s in result.samples} == {f"model-size {SIZE}x{SIZE}"}
    assert len(result.raw) == 3 and min(result.raw) > 0
    assert len(result.served) == 2
    ok = sum(s.status == 200 for s in result.samples)
    assert result.served_total == pytest.approx(ok / result.elapsed)
    assert result.raw_backend == result.info["backend"]  # same machine, same device for both
    assert result.rss_warm[1] > 0 and result.rss_after[1] > 0
    assert not result.failures
    assert (tmp_path / "load.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "raw = best of batch [1, 8]" in out
    assert sum(result.batch_histogram.values()) > 0  # the server's agmm_batch_inputs, not an empty dict or junk
    assert all(n > 0 for n in result.batch_histogram.values())
    # Every request was answered before /metrics was read after the run, and each answer follows its batch's count.
    assert result.inputs_run[0] == result.inputs_answered == ok


def test_mixed_traffic(tiny_model):
    mix = "small=40x30*2,photo=96x72*2,street=160x80"  # 1, 6 and 12 tiles on the 64x64 model (stride 1/3 of the tile)
    result = serve_load.main(["--model", str(tiny_model), "--traffic", "mixed", "--mix", mix, *SHORT,
                              "--duration", "4", "--rounds", "1", "--raw-seconds", "0.2"])
    _check_counts(result)
    assert {s.kind for s in result.samples} <= {"small 40x30", "photo 96x72", "street 160x80"}
    tiles = {"small 40x30": 1, "photo 96x72": 6, "street 160x80": 12}
    answered = sum(tiles[s.kind] for s in result.samples if s.status == 200)
    assert result.inputs_answered == answered > 0
    # Refused images (503 under a deadline) never run; partly run ones can only be tiled images refused mid-way.
    assert result.inputs_run[0] >= answered
    assert len(result.raw) == 2 and min(result.raw) > 0
    for kind in {s.kind for s in result.samples if s.status == 200}:
        p50, p99 = result.latency(kind)
        assert 0 < p50 <= p99


def test_hostile_traffic_classifies_every_answer(tiny_model, tmp_path):
    # A few kinds only, to show that --only filters the bad inputs; the whole mix is the slow test's.
    result = serve_load.main(["--model", str(tiny_model), "--traffic", "hostile", *SHORT, "--duration", "3",
                              "--slow-clients", "0", "--only", "truncated", "bomb", "field", "file",
                              "--plot", str(tmp_path / "hostile.png")])
    _check_counts(result)
    kinds = {s.kind: s.expect for s in result.samples}
    assert GOOD in kinds.values() and BAD in kinds.values()
    assert not any("strip" in kind or "over tile limit" in kind for kind in kinds)
    wrong = {s.kind for s in result.samples if not serve_load.acceptable(s.expect, s.status)}
    assert {line.split(":")[0] for line in result.failures} >= wrong
    assert 0 < result.lone_before and result.lone_after is not None and result.settle_s is not None
    assert (tmp_path / "hostile.png").stat().st_size > 0


@pytest.mark.gpu
def test_cuda_run_reports_cuda_backends(tiny_model):
    result = serve_load.main(["--model", str(tiny_model), "--device", "cuda", *SHORT, "--duration", "3",
                              "--rounds", "1", "--raw-seconds", "0.5"])
    _check_counts(result)
    assert "cuda" in result.info["backend"] and "cuda" in result.raw_backend
    assert min(result.raw) > 0


@pytest.mark.slow
def test_hostile_traffic_full_mix(tiny_model):
    result = serve_load.main(["--model", str(tiny_model), "--traffic", "hostile", *SHORT, "--clients", "4",
                              "--duration", "10", "--settle", "30"])
    _check_counts(result)
    expects = {s.kind: s.expect for s in result.samples}
    assert any(kind.startswith("strip 100000x1") for kind in expects)
    assert expects["dropped mid-upload"] == expects["slow upload, 1 byte per 0.5 s"] == CLIENT
    assert all(expect == BAD for kind, expect in expects.items() if kind.startswith(("corrupt", "truncated")))


# ------------------------------------------------------------------------- without a server


@pytest.mark.parametrize("expect,status,ok", [
    (GOOD, 200, True), (GOOD, 503, False), (GOOD, 400, False), (GOOD, "timeout", False),
    (BAD, 400, True), (BAD, 413, True), (BAD, 422, True), (BAD, 200, False), (BAD, 503, False),
    (BAD, "timeout", False), (ODD, 200, True), (ODD, 400, True), (ODD, 500, False),
    (CLIENT, "dropped", True), (CLIENT, "held", True), (CLIENT, 408, True), (CLIENT, 500, False),
])
def test_acceptable_answers(expect, status, ok):
    assert serve_load.acceptable(expect, status) is ok


def test_check_answers_names_each_wrong_kind():
    sample = serve_load.Sample
    samples = [sample("truncated png", BAD, 0, 0.1, 400, 0), sample("truncated png", BAD, 0, 0.1, 503, 0),
               sample("photo", GOOD, 0, 0.1, 200, 1), sample("long name", ODD, 0, 0.1, 500, 0)]
    assert serve_load.check_answers(samples) == ["truncated png: 503 x 1 (expected a 4xx)",
                                                 "long name: 500 x 1 (expected 200 or a 4xx)"]


def test_sizes_and_mixes_parse():
    assert serve_load.parse_size("512") == (512, 512)
    assert serve_load.parse_size("512x1024") == (512, 1024)
    assert serve_traffic.parse_mix("a=640x480*4,b=2048x1024") == (serve_traffic.SizeClass("a", 640, 480, 4),
                                                                 serve_traffic.SizeClass("b", 2048, 1024, 1))
    with pytest.raises(ValueError, match="name=WIDTHxHEIGHT"):
        serve_traffic.parse_mix("640x480")


def test_tile_limit_is_the_servers_max_inputs():
    assert serve_load.reported_tile_limit({"max_pixels": 10, "max_inputs": 64}) == ("max_inputs", 64)
    assert serve_load.reported_tile_limit({"max_pixels": 10, "max_tiles": 64}) is None
    assert serve_load.reported_tile_limit({"max_inputs": 0}) is None


def test_batch_histogram_reads_the_servers_batch_inputs_metric():
    metrics = "\n".join([
        "# TYPE agmm_batch_inputs histogram",
        'agmm_batch_inputs_bucket{le="1.0"} 3.0', 'agmm_batch_inputs_bucket{le="2.0"} 5.0',
        'agmm_batch_inputs_bucket{le="4.0"} 5.0', 'agmm_batch_inputs_bucket{le="8.0"} 9.0',
        'agmm_batch_inputs_bucket{le="+Inf"} 9.0', "agmm_batch_inputs_count 9.0",
        'adaptive_batch_size_bucket{le="1.0",method_name="segment_batch",service_name="x"} 7.0',
    ])
    assert serve_load.batch_histogram(metrics) == {"1": 3, "2": 2, "5-8": 4}
    assert serve_load.batch_histogram("") == {}
    assert serve_load.inputs_run(metrics + "\nagmm_batch_inputs_sum 37.0") == (37, 9)
    assert serve_load.inputs_run("") == (0, 0)


def test_hostile_inputs_follow_the_tile_limit():
    probes, notes = serve_traffic.hostile_probes((SIZE, SIZE), {"max_pixels": 1_000_000},
                                                  tile_limit=("max_inputs", 20))
    expects = {p.kind: p.expect for p in probes}
    assert expects["large 128x128 (16 tiles)"] == GOOD
    over = next(kind for kind in expects if kind.startswith("over tile limit"))
    assert expects[over] == BAD and int(over.split("(")[1].split()[0]) > 20
    assert expects[next(kind for kind in expects if kind.startswith("strip"))] == BAD
    assert notes[0].startswith("tile limit: 20 (/info max_inputs)")
    for probe in probes:
        if probe.expect == GOOD:  # good images decode; their tile count is the library's
            image = decode_image(probe.image)
            assert serve_traffic.tile_count(image.shape[1], image.shape[0], (SIZE, SIZE)) <= 20
    assert {BAD, GOOD, ODD, CLIENT} == set(expects.values())
