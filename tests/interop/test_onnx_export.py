"""ONNX export, verified in ONNX Runtime: float within 1e-5; integer models agree on every argmax and differ by at
most one output step (the count of differing elements is printed with ``-s``)."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="ONNX export needs the optional extra 'onnx'")
pytest.importorskip("onnxruntime", reason="exports are verified in ONNX Runtime")
from torch_digits_cnn import FIXTURES, nanoopt_digits_cnn  # noqa: E402

import nanoopt as no  # noqa: E402
from nanoopt import data, models, nn, prune, quant  # noqa: E402
from nanoopt.interop.onnx_export import OnnxExportError  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return data.load_digits("train"), data.load_digits("test")


@pytest.fixture(scope="module")
def cnn():
    model = nanoopt_digits_cnn()
    model.load_state_dict(no.io.load_torch(os.path.join(FIXTURES, "digits_cnn.pth")))
    return model.eval()


def resnet():
    no.manual_seed(0)
    model = models.small_resnet(widths=(4, 8))
    for module in model.modules():          # non-trivial running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean[...] = np.random.default_rng(1).normal(0, 0.1, module.num_features)
            module.running_var[...] = np.random.default_rng(2).uniform(0.5, 1.5, module.num_features)
    return model.eval()


def transformer_like():
    no.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 16),
                         nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 10), nn.Sigmoid()).eval()


# ===================================================================== float
@pytest.mark.parametrize("build", ["cnn", "resnet", "transformer_like", "lenet5"])
def test_float_exports_match_onnxruntime_within_1e5(tmp_path, digits, cnn, build):
    model = {"cnn": lambda: cnn, "resnet": resnet, "transformer_like": transformer_like,
             "lenet5": lambda: models.lenet5(input_size=8).eval()}[build]()
    images = digits[1][0]
    path = tmp_path / "m.onnx"
    no.onnx.export(model, path, images[:2])
    report = no.onnx.compare(model, path, images)
    assert report["max_abs_diff"] < 1e-5 and report["argmax_agree"] == 1.0, report


def test_export_then_import_gives_the_same_model(tmp_path, digits, cnn):
    path = tmp_path / "cnn.onnx"
    no.onnx.export(cnn, path, digits[1][0][:1])
    again = no.onnx.load(path)
    assert [type(m) for m in again] == [type(m) for m in cnn]
    with no.no_grad():
        np.testing.assert_allclose(again(digits[1][0]).data, cnn(digits[1][0]).data, rtol=1e-6, atol=1e-6)


def test_pruned_model_exports_its_zeros(tmp_path, digits):
    no.manual_seed(0)
    model = models.lenet_300_100(in_features=64).eval()
    prune.global_unstructured(prune.prunable_parameters(model), amount=0.8)   # masks still attached
    path = tmp_path / "pruned.onnx"
    proto = no.onnx.export(model, path, digits[1][0][:2])
    weights = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.size for w in weights)
    assert abs(zeros / total - 0.8) < 1e-3, zeros / total
    assert no.onnx.compare(model, path, digits[1][0])["max_abs_diff"] < 1e-5


# ===================================================================== integer (QDQ)
def check_integer(model, path, images, label):
    report = no.onnx.compare(model, path, images)
    print(f"{label}: {report['differing']} of {report['elements']} output elements differ from ONNX Runtime "
          f"(at most {report['max_steps']} step); argmax agrees on {100 * report['argmax_agree']:.1f}% of images")
    assert report["argmax_agree"] == 1.0, report
    assert report["max_steps"] <= 1, report
    return report


@pytest.mark.parametrize("build", ["cnn", "resnet", "resnet 16x8"])
def test_int8_qdq_export_agrees_with_onnxruntime(tmp_path, digits, cnn, build):
    model = cnn if build == "cnn" else resnet()
    config = quant.QuantConfig.int16_activations() if build.endswith("16x8") else None
    int8 = quant.quantize_static(model, digits[0][0][:256], config, progress=False)
    path = tmp_path / "int8.onnx"
    proto = no.onnx.export(int8, path, digits[1][0][:2])
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0].endswith("_weight")]
    assert per_channel and all(a.name == "axis" and a.i == 0 for n in per_channel for a in n.attribute)
    check_integer(int8, path, digits[1][0], f"int8 {build}")


def test_4bit_weights_are_int4_and_the_file_shrinks(tmp_path, digits):
    no.manual_seed(0)
    model = models.lenet_300_100(in_features=64).eval()
    calibration = digits[0][0][:256]
    int8 = quant.quantize_static(model, calibration, progress=False)
    w4a8 = quant.quantize_static(model, calibration, quant.QuantConfig(weight=quant.weight_spec(4)), progress=False)
    no.onnx.export(int8, tmp_path / "int8.onnx", digits[1][0][:2])
    proto = no.onnx.export(w4a8, tmp_path / "w4a8.onnx", digits[1][0][:2])
    int4 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4 and t.name.endswith("weight_q")]
    assert sum(int(np.prod(t.dims)) for t in int4) == sum(m.weight.size for m in model.modules()
                                                          if isinstance(m, nn.Linear))
    size8, size4 = os.path.getsize(tmp_path / "int8.onnx"), os.path.getsize(tmp_path / "w4a8.onnx")
    assert size4 < 0.6 * size8, (size4, size8)
    check_integer(w4a8, tmp_path / "w4a8.onnx", digits[1][0], "w4a8 lenet-300-100")


@pytest.mark.parametrize("bits, group_size", [(4, 16), (4, None), (8, 32)])
def test_weight_only_exports_block_quantization(tmp_path, digits, cnn, bits, group_size):
    small = quant.quantize_weights(cnn, bits=bits, group_size=group_size)
    path = tmp_path / "wo.onnx"
    proto = no.onnx.export(small, path, digits[1][0][:2])
    blocked = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert blocked and all({a.name for a in n.attribute} == {"axis", "block_size"} for n in blocked)
    kinds = {t.data_type for t in proto.graph.initializer if t.name.endswith("weight_q")}
    assert kinds == {onnx.TensorProto.INT4 if bits <= 4 else onnx.TensorProto.INT8}
    assert proto.opset_import[0].version == 21
    assert no.onnx.compare(small, path, digits[1][0])["max_abs_diff"] < 1e-5


# ===================================================================== refusals
def test_prepared_models_and_functional_forwards_are_refused(tmp_path, digits, cnn):
    prepared = quant.prepare(cnn)
    with pytest.raises(OnnxExportError, match="quant.convert it first"):
        no.onnx.export(prepared, tmp_path / "p.onnx", digits[1][0][:2])

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.reshape(x.shape[0], -1))

    with pytest.raises(OnnxExportError, match=r"input 0 of layer 'fc' \(Linear\) was computed outside any module"):
        no.onnx.export(Functional(), tmp_path / "f.onnx", digits[1][0][:2])
    with pytest.raises(OnnxExportError, match="GELU.*needs opset >= 20"):
        no.onnx.export(transformer_like(), tmp_path / "t.onnx", digits[1][0][:2], opset=17)
