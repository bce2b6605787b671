import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from agmm_deploy.contract import read_onnx_metadata
from agmm_deploy.export.onnx import export_onnx
from agmm_deploy.contract import ModelMeta
from agmm_deploy.model import DeepLabV3Plus, ModelConfig

TINY = ModelConfig(backbone="resnet18", num_classes=19)


def tiny_model() -> DeepLabV3Plus:
    model = DeepLabV3Plus(TINY)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))  # BN running stats away from identity, so BN folding is exercised
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_model()
    meta = ModelMeta.for_dataset("cityscapes", (96, 96))
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export_onnx(model, meta, path, height=64, width=64, opset=17, simplify=True,
                         checkpoint_sha256="ab" * 32, max_batch=4)
    return model, meta, result


def test_single_self_contained_file_that_passes_the_checker(exported):
    _, _, result = exported
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["model.onnx"]  # no external data files
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    # opset 17 was asked for; the dynamo exporter emits 18 and the result says so
    assert result.opset == 18 and result.simplified and result.outputs == ("logits",)


def test_metadata_round_trips(exported):
    _, meta, result = exported
    read_meta, fields = read_onnx_metadata(result.path)
    assert read_meta.classes == meta.classes and read_meta.palette == meta.palette
    assert read_meta.mean == meta.mean and read_meta.std == meta.std
    assert read_meta.input_size == (64, 64)  # the export size, not the checkpoint's
    assert fields["opset"] == 18 and fields["precision"] == "fp32" and fields["device"] == "any"
    assert fields["checkpoint_sha256"] == "ab" * 32
    assert fields["max_batch"] == 4 and fields["dynamic_batch"] is True and fields["dynamic_hw"] is False
    assert fields["versions"]["torch"] == torch.__version__.split("+")[0]
    assert "onnx" in fields["versions"] and fields["model_config"] == TINY.to_dict()


def test_logits_match_pytorch_at_any_batch(exported):
    model, _, result = exported
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    (logits,) = session.run(None, {"image": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("names", [tuple("abcde"), tuple(f"c{i}" for i in range(21))])
def test_metadata_naming_other_classes_than_the_model_outputs_is_refused(tmp_path, names):
    meta = ModelMeta.for_dataset("folder", (64, 64), classes=names)
    with pytest.raises(ValueError, match=rf"the metadata names {len(names)} classes \(.*\) for a model with 19 "
                                         "output channels; expected one class name and colour per output"):
        export_onnx(tiny_model(), meta, tmp_path / "m.onnx", height=64, width=64)
    assert not list(tmp_path.iterdir())


def test_dynamic_hw_export_runs_other_sizes(tmp_path):
    meta = ModelMeta.for_dataset("pascal", (64, 64))
    result = export_onnx(DeepLabV3Plus(ModelConfig(backbone="resnet18", num_classes=21)).eval(), meta,
                         tmp_path / "dyn.onnx", height=64, width=64, dynamic_hw=True, dynamic_batch=False)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    dims = session.get_inputs()[0].shape
    assert dims[0] == 1 and isinstance(dims[2], str) and isinstance(dims[3], str)
    out = session.run(None, {"image": np.zeros((1, 3, 48, 80), np.float32)})[0]
    assert out.shape == (1, 21, 48, 80)
    _, fields = read_onnx_metadata(result.path)
    assert fields["dynamic_hw"] is True and fields["max_batch"] == 1


def test_read_metadata_of_a_foreign_onnx_names_the_file(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="foreign.onnx carries no valid agmm-deploy model metadata"):
        read_onnx_metadata(path)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_onnx_is_fp32_only(tmp_path, precision):
    """The graph is float32 whatever is asked; recording fp16 would make runners pick looser parity gates."""
    with pytest.raises(ValueError, match=rf"precision='{precision}' cannot be exported to ONNX directly: the "):
        export_onnx(tiny_model(), ModelMeta.for_dataset("pascal", (64, 64)), tmp_path / "m.onnx", height=64,
                    width=64, precision=precision)
    assert not list(tmp_path.iterdir())
