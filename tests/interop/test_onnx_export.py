"""ONNX export, verified in ONNX Runtime: float within 1e-5; integer models as QDQ agree on every argmax and differ
by at most one output step (the count of differing elements is printed with ``-s``); as integer operators they are
bit-exact."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    check_integer(int8, path, digits[1][0], f"QDQ {build}")


@pytest.mark.parametrize("build", ["cnn", "resnet", "lenet5", "w4a8 lenet-300-100"])
def test_integer_operator_export_is_bit_exact_in_onnxruntime(tmp_path, digits, cnn, build):
    no.manual_seed(0)
    model = {"cnn": lambda: cnn, "resnet": resnet, "lenet5": lambda: models.lenet5(input_size=8).eval(),
             "w4a8 lenet-300-100": lambda: models.lenet_300_100(in_features=64).eval()}[build]()
    config = quant.QuantConfig(weight=quant.weight_spec(4)) if build.startswith("w4a8") else None
    int8 = quant.quantize_static(model, digits[0][0][:256], config, progress=False)
    path = tmp_path / "qop.onnx"
    proto = no.onnx.export(int8, path, digits[1][0][:2], quant_format="qoperator")
    ops = {n.op_type for n in proto.graph.node}
    assert ops & {"ConvInteger", "MatMulInteger"} and "DequantizeLinear" in ops     # only at the output
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == 1
    report = check_integer(int8, path, digits[1][0], f"integer operators {build}")
    assert report["differing"] == 0 and report["max_abs_diff"] == 0.0, report


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_layers_without_integer_kernels_export_as_float_fallbacks(tmp_path, digits, quant_format):
    with pytest.warns(UserWarning, match="no integer kernel"):
        int8 = quant.quantize_static(transformer_like(), digits[0][0][:256], progress=False)
    fallbacks = [m for m in int8.modules() if type(m).__name__ == "FloatFallback"]
    assert len(fallbacks) >= 3                       # LayerNorm, GELU, Tanh, Sigmoid run in float
    path = tmp_path / "fallback.onnx"
    no.onnx.export(int8, path, digits[1][0][:2], quant_format=quant_format)
    check_integer(int8, path, digits[1][0], f"float fallbacks, {quant_format}")


def test_integer_operator_form_refuses_16_bit_activations(tmp_path, digits):
    int16 = quant.quantize_static(resnet(), digits[0][0][:64], quant.QuantConfig.int16_activations(), progress=False)
    with pytest.raises(OnnxExportError, match="int16 activations with quant_format='qdq'"):
        no.onnx.export(int16, tmp_path / "x.onnx", digits[1][0][:2], quant_format="qoperator")


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


# ===================================================================== the written-out requantization
@settings(max_examples=60, deadline=None)
@given(acc=st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=64),
       exponent=st.floats(-40, 12), ties=st.booleans())
def test_written_out_requantization_equals_nanoopts_bit_for_bit(acc, exponent, ties):
    """The int64 ONNX nodes of MultiplyByQuantizedMultiplier against nanoopt's reference, in ONNX Runtime."""
    import onnxruntime

    from nanoopt.interop.onnx_export import _Graph, _multiply_by_quantized_multiplier
    from nanoopt.spec import multiply_by_quantized_multiplier, quantize_multiplier

    power = int(np.floor(exponent))
    real = 2.0 ** power if ties else 2.0 ** exponent
    m0, shift = quantize_multiplier(real)
    halves = []
    if ties and power < 0:   # acc * 2^power = (2j + 1) / 2 exactly: every rounding rule meets its tie here
        halves = [sign * (2 * j + 1) << (-power - 1) for j in range(6) for sign in (1, -1)]
        halves = [h for h in halves if -2**31 <= h < 2**31]
    values = np.array(acc + halves + [-1, 0, 1], dtype=np.int64)
    g = _Graph(21)
    out = _multiply_by_quantized_multiplier(g, "acc", m0, shift, (), "r")
    int64 = onnx.TensorProto.INT64
    graph = g.helper.make_graph(g.nodes, "mbqm", [g.helper.make_tensor_value_info("acc", int64, [None])],
                                [g.helper.make_tensor_value_info(out, int64, [None])], g.initializers)
    proto = g.helper.make_model(graph, opset_imports=[g.helper.make_opsetid("", 21)])
    proto.ir_version = 10
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = multiply_by_quantized_multiplier(values.astype(np.int32), m0, shift).astype(np.int64)
    np.testing.assert_array_equal(session.run(None, {"acc": values})[0], ours)


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_a_model_with_weight_scales_raised_for_its_bias_exports(tmp_path, quant_format):
    """Tiny calibration inputs put the conv's biases beyond int32 on ``s_in s_w``; convert raises those weight
    scales (``quant.lowering``, ONNX Runtime's rule). The export carries the raised scales: as integer operators
    ONNX Runtime gives the model's bits (the bias near 2^31 is added in int64), as QDQ within a step."""
    no.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(75, 4)).eval()
    model[0].weight.data[...] *= np.float32(0.01)
    model[0].bias.data[...] = np.array([3.0, 1e-4, -2.0], np.float32)
    x = (np.random.default_rng(3).normal(size=(64, 2, 5, 5)) * 1e-5).astype(np.float32)
    with pytest.warns(UserWarning, match="the bias does not fit int32"):
        int8 = quant.quantize_static(model, x[:32], progress=False)
    assert int(np.abs(int8.model[0].bias.astype(np.int64)).max()) > 2**30  # a bias code near the int32 limit
    path = tmp_path / "raised.onnx"
    no.onnx.export(int8, path, x[:2], quant_format=quant_format)
    report = check_integer(int8, path, x[32:], f"raised weight scales, {quant_format}")
    if quant_format == "qoperator":
        assert report["differing"] == 0 and report["max_abs_diff"] == 0.0, report
