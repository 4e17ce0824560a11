"""ONNX import: every supported operator equals ONNX Runtime within 1e-5; anything else is a clear error."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx", reason="ONNX import needs the optional extra 'onnx'")
ort = pytest.importorskip("onnxruntime", reason="the reference outputs come from ONNX Runtime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import nanoopt as no  # noqa: E402
from nanoopt import data, distill, nn, prune, quant  # noqa: E402
from nanoopt.interop.onnx_import import OnnxImportError  # noqa: E402
from nanoopt.interop.onnx_modules import GraphModule  # noqa: E402

RNG = np.random.default_rng(0)


def weights(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def make_model(nodes, input_shape, initializers, opset=17, output_shape=None, output="y"):
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)  # fills in the output's shape


def onnxruntime_outputs(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def assert_matches_onnxruntime(model, x, atol=1e-5):
    imported = no.onnx.load(model)
    with no.no_grad():
        ours = imported(x).data
    np.testing.assert_allclose(ours, onnxruntime_outputs(model, x), rtol=1e-5, atol=atol)
    return imported


# ===================================================================== operators, one graph each
@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), stride=st.integers(1, 2), pad=st.integers(0, 2),
       dilation=st.integers(1, 2), kernel=st.sampled_from([1, 3]), bias=st.booleans(), asymmetric=st.booleans())
def test_conv_with_groups_strides_pads_dilations(groups, stride, pad, dilation, kernel, bias, asymmetric):
    w = weights(8, 4 // groups, kernel, kernel)
    pads = [pad, pad, pad + 1, pad] if asymmetric else [pad] * 4
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    node = helper.make_node("Conv", inputs, ["y"], group=groups, strides=[stride, stride], pads=pads,
                            dilations=[dilation, dilation])
    model = make_model([node], [2, 4, 9, 9], {"w": w, "b": weights(8)} if bias else {"w": w})
    assert_matches_onnxruntime(model, RNG.standard_normal((2, 4, 9, 9)).astype(np.float32))


@pytest.mark.parametrize("trans_b, alpha, beta, bias_shape", [(1, 1.0, 1.0, (5,)), (0, 0.5, 2.0, (1, 5)),
                                                              (1, 1.0, 1.0, None)])
def test_gemm_folds_alpha_beta_and_transposition(trans_b, alpha, beta, bias_shape):
    b = weights(5, 6) if trans_b else weights(6, 5)
    inits = {"b": b} if bias_shape is None else {"b": b, "c": weights(*bias_shape)}
    node = helper.make_node("Gemm", ["x", *inits], ["y"], transB=trans_b, alpha=alpha, beta=beta)
    imported = assert_matches_onnxruntime(make_model([node], ["N", 6], inits), weights(3, 6, scale=1))
    assert isinstance(imported[0], nn.Linear)


@pytest.mark.parametrize("op, attributes, extra", [
    ("Relu", {}, {}), ("Sigmoid", {}, {}), ("Tanh", {}, {}),
    ("Gelu", {}, {}), ("Gelu", {"approximate": "tanh"}, {}),
    ("Clip", {}, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}), ("Clip", {}, {"lo": np.float32(0.0)}),
    ("Softmax", {"axis": 1}, {}), ("Softmax", {}, {}),
])
def test_elementwise_activations(op, attributes, extra):
    opset = 20 if op == "Gelu" else 17
    node = helper.make_node(op, ["x", *extra], ["y"], **attributes)
    assert_matches_onnxruntime(make_model([node], ["N", 3, 5], extra, opset=opset),
                               weights(4, 3, 5, scale=2))


def test_softmax_before_opset_13_coerces_to_2d():
    node = helper.make_node("Softmax", ["x"], ["y"], axis=1)
    assert_matches_onnxruntime(make_model([node], [2, 3, 4], {}, opset=11), weights(2, 3, 4, scale=2))


@pytest.mark.parametrize("op, attributes", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("GlobalAveragePool", {}),
])
def test_pools(op, attributes):
    node = helper.make_node(op, ["x"], ["y"], **attributes)
    assert_matches_onnxruntime(make_model([node], ["N", 3, 8, 8], {}), weights(2, 3, 8, 8, scale=2))


def test_batchnorm_flatten_reshape_layernorm():
    c = 4
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("Flatten", ["bn"], ["f"], axis=1),
        helper.make_node("Reshape", ["f", "shape"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "ls", "lb"], ["y"], axis=-1, epsilon=1e-4),
    ]
    inits = {"s": weights(c) + 1, "b": weights(c), "m": weights(c), "v": np.abs(weights(c)) + 0.5,
             "shape": np.array([0, 2, -1], np.int64), "ls": weights(18) + 1, "lb": weights(18)}
    imported = assert_matches_onnxruntime(make_model(nodes, ["N", c, 3, 3], inits, opset=17),
                                          weights(5, c, 3, 3, scale=2))
    assert [type(m).__name__ for m in imported] == ["BatchNorm2d", "Flatten", "Reshape", "LayerNorm"]


def test_branches_add_mul_concat_make_a_graph_module():
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["x", "w2"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["ra", "b"], ["s"]),
        helper.make_node("Mul", ["s", "k"], ["m"]),
        helper.make_node("Mul", ["m", "b"], ["p"]),
        helper.make_node("Concat", ["p", "s", "x"], ["c"], axis=1),
        helper.make_node("Add", ["c", "bias"], ["y"]),
    ]
    inits = {"w1": weights(3, 2, 3, 3), "w2": weights(3, 2, 3, 3), "k": weights(1, 3, 1, 1),
             "bias": weights(1, 8, 1, 1)}
    imported = assert_matches_onnxruntime(make_model(nodes, ["N", 2, 5, 5], inits), weights(2, 2, 5, 5, scale=1))
    assert isinstance(imported, GraphModule)
    assert sum(isinstance(m, nn.Add) for m in imported.modules()) == 1


def test_dynamic_reshape_of_the_batch_axis_is_resolved_by_shape_inference():
    # what torch exports for x.view(x.size(0), -1)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"]),
    ]
    inits = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus_one": np.array([-1], np.int64),
             "w": weights(12, 4)}
    imported = assert_matches_onnxruntime(make_model(nodes, ["N", 3, 4], inits), weights(2, 3, 4, scale=1))
    assert [type(m).__name__ for m in imported] == ["Flatten", "Linear"]


# ===================================================================== refusals name the node and op
def test_unsupported_operator_names_node_and_op():
    model = make_model([helper.make_node("Erf", ["x"], ["y"], name="my_erf")], ["N", 3], {})
    with pytest.raises(OnnxImportError, match=r"node 'my_erf' \(Erf\): operator Erf is not supported"):
        no.onnx.load(model)


def test_dynamic_shapes_we_cannot_resolve_are_refused():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"], name="rs")]
    with pytest.raises(OnnxImportError, match=r"node 'rs' \(Reshape\).*computed at run time"):
        no.onnx.load(make_model(nodes, ["N", "H"], {}))
    weight_from_input = [helper.make_node("Conv", ["x", "x"], ["y"], name="c")]
    with pytest.raises(OnnxImportError, match=r"node 'c' \(Conv\).*must be a constant"):
        no.onnx.load(make_model(weight_from_input, [1, 1, 3, 3], {}))


def test_bad_opset_attributes_and_files(tmp_path):
    with pytest.raises(OnnxImportError, match="opset 6"):
        no.onnx.load(make_model([helper.make_node("Relu", ["x"], ["y"])], [1], {}, opset=6))
    ceil = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, name="p")
    with pytest.raises(OnnxImportError, match=r"node 'p' \(MaxPool\): ceil_mode=1 changes the output size"):
        no.onnx.load(make_model([ceil], [1, 1, 5, 5], {}))
    truncated = tmp_path / "t.onnx"
    good = make_model([helper.make_node("Gemm", ["x", "w"], ["y"])], [1, 3], {"w": weights(3, 3)})
    truncated.write_bytes(good.SerializeToString()[:20])
    with pytest.raises(OnnxImportError, match="t.onnx"):
        no.onnx.load(truncated)
    mismatched = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], name="g"),
                             helper.make_node("Gemm", ["y", "w"], ["z"], name="g2")], [1, 3], {"w": weights(3, 4)},
                            output="z")
    with pytest.raises(OnnxImportError, match=r"shapes do not fit.*Gemm, node name: g2.*mismatch"):
        no.onnx.load(mismatched)


# ===================================================================== torch.onnx.export -> import
def _torch_cnn_onnx(tmp_path, epochs=2):
    torch = pytest.importorskip("torch", reason="exports a torch-trained model")
    from torch_digits_cnn import train_torch_digits_cnn

    reference = train_torch_digits_cnn(epochs=epochs, seed=2)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(reference, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return reference, path


def test_committed_torch_export_imports_with_torchs_and_onnxruntimes_outputs():
    from torch_digits_cnn import FIXTURES

    path = f"{FIXTURES}/digits_cnn.onnx"
    expected = np.load(f"{FIXTURES}/digits_cnn_expected.npz")["logits"]     # torch's own outputs
    images, _ = data.load_digits("test")
    model = no.onnx.load(path)
    assert isinstance(model, nn.Sequential) and isinstance(model[0], nn.Conv2d)
    with no.no_grad():
        ours = model(images).data
    np.testing.assert_allclose(ours, onnxruntime_outputs(onnx.load(path), images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_exported_cnn_imports_with_the_same_outputs(tmp_path):
    import torch

    reference, path = _torch_cnn_onnx(tmp_path)
    images, _ = data.load_digits("test")
    model = no.onnx.load(path)
    with no.no_grad():
        ours = model(images).data
    np.testing.assert_allclose(ours, onnxruntime_outputs(onnx.load(path), images), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(ours, reference(torch.from_numpy(images)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_imported_model_trains_prunes_and_quantizes(tmp_path):
    _, path = _torch_cnn_onnx(tmp_path)
    train, test = data.load_digits("train"), data.load_digits("test")
    model = no.onnx.load(path)
    before = no.evaluate(model, test)["accuracy"]
    no.fit(model, train, epochs=1, lr=0.01, progress=False)           # gradients flow through imported layers
    prune.global_unstructured(prune.prunable_parameters(model), amount=0.5)
    no.fit(model, train, epochs=1, lr=0.01, progress=False)
    prune.remove_all(model)
    weights_ = [m.weight.data for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert abs(sum((w == 0).sum() for w in weights_) / sum(w.size for w in weights_) - 0.5) < 0.01
    pruned = no.evaluate(model, test)["accuracy"]
    int8 = quant.quantize_static(model, train[0][:256], progress=False)
    quantized = no.evaluate(int8, test)["accuracy"]
    assert before > 0.8 and pruned > before - 0.05 and quantized > pruned - 0.02, (before, pruned, quantized)
    no.manual_seed(0)
    student = no.models.mlp(64, (32,))
    teacher = no.onnx.load(path)
    frozen = teacher.state_dict()
    distiller = distill.Distiller(student, teacher, distill.DistillConfig())    # an imported teacher
    distiller.fit(train, epochs=3, lr=0.05, progress=False)
    distiller.remove_hooks()
    assert no.evaluate(student, test)["accuracy"] > 0.5                     # learnt (chance: 0.1)
    for key, value in teacher.state_dict().items():
        np.testing.assert_array_equal(value, frozen[key], err_msg=key)    # the teacher only teaches


@pytest.mark.slow
def test_the_interop_example_runs(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, os.path.join(root, "examples", "interop.py")], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": root}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(within 1e-5)" in result.stdout and "argmax agrees on 100.0%" in result.stdout, result.stdout
    assert "NOT within" not in result.stdout


def test_remaining_operators_import_and_export_back(tmp_path):
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),                 # (N, 5, 4)
        helper.make_node("Sub", ["one", "t"], ["s"]),                                 # constant first
        helper.make_node("Div", ["s", "two"], ["d"]),
        helper.make_node("MatMul", ["d", "x"], ["m"]),                                # runtime @ runtime: (N, 5, 5)
        helper.make_node("Concat", ["m", "c"], ["cat"], axis=2),                      # with a constant: (N, 5, 7)
        helper.make_node("Flatten", ["cat"], ["f"], axis=2),                          # (N*5, 7)
        helper.make_node("Clip", ["f", "lo", "hi"], ["y"]),
    ]
    inits = {"one": np.float32(1.0), "two": np.full((1, 1, 4), 2.0, np.float32), "c": weights(2, 5, 2),
             "lo": np.float32(-0.3), "hi": np.float32(0.4)}
    model = make_model(nodes, [2, 4, 5], inits)
    x = weights(2, 4, 5, scale=1)
    imported = assert_matches_onnxruntime(model, x)
    assert isinstance(imported, GraphModule)
    path = tmp_path / "again.onnx"
    no.onnx.export(imported, path, x)                       # and back out: the same operators
    assert {n.op_type for n in onnx.load(path).graph.node} >= {"Transpose", "Sub", "Div", "MatMul", "Concat",
                                                                "Flatten", "Clip"}
    assert no.onnx.compare(imported, path, x)["max_abs_diff"] < 1e-6
