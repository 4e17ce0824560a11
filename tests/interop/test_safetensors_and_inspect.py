"""safetensors save/load, and ``nanoopt inspect`` on every format."""

import os

import numpy as np
import pytest
from torch_digits_cnn import FIXTURES

import nanoopt as no
from nanoopt import models, nn, prune, quant
from nanoopt.cli import main
from nanoopt.interop.inspection import inspect_file, tensor_bits


# ===================================================================== safetensors
def test_safetensors_round_trip_keeps_order_dtypes_and_values(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is an optional extra")
    from nanoopt.interop.safetensors_io import load_safetensors, save_safetensors

    no.manual_seed(0)
    model = models.small_resnet(widths=(4, 8))
    path = tmp_path / "resnet.safetensors"
    save_safetensors(model, path, metadata={"trained_on": "digits"})
    state = load_safetensors(path)
    assert list(state) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert state[key].dtype == value.dtype
        np.testing.assert_array_equal(state[key], value)
    other = models.small_resnet(widths=(4, 8))
    other.load_state_dict(state)
    int8 = quant.quantize_static(model, np.random.default_rng(0).random((8, 1, 8, 8), np.float32), progress=False)
    save_safetensors(int8, tmp_path / "int8.safetensors")             # integer buffers too
    assert load_safetensors(tmp_path / "int8.safetensors").keys() == int8.state_dict().keys()


def test_safetensors_bad_files_and_values(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is an optional extra")
    from nanoopt.interop.safetensors_io import load_safetensors, save_safetensors

    path = tmp_path / "m.safetensors"
    save_safetensors({"w": np.ones((2, 2), np.float32)}, path)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="t.safetensors: not a readable safetensors file"):
        load_safetensors(truncated)
    with pytest.raises(TypeError, match="'s' has dtype <U1"):
        save_safetensors({"s": np.array(["a"])}, tmp_path / "s.safetensors")


# ===================================================================== inspect
def test_tensor_bits():
    assert tensor_bits(np.array([-8, 7], np.int8)) == 4
    assert tensor_bits(np.array([-9, 7], np.int8)) == 5
    assert tensor_bits(np.array([0, 15], np.uint8)) == 4
    assert tensor_bits(np.zeros(3, np.uint8), "weight_packed") == 4
    assert tensor_bits(np.zeros(3, np.float16)) == 16


def test_inspect_reports_sparsity_bits_and_bytes_of_a_compressed_model(tmp_path):
    no.manual_seed(0)
    model = models.lenet_300_100(in_features=64)
    prune.global_unstructured(prune.prunable_parameters(model), amount=0.75)
    prune.remove_all(model)
    no.io.save(model, tmp_path / "pruned.npz")
    info = inspect_file(tmp_path / "pruned.npz")
    assert info["format"] == "nanoopt .npz" and info["parameters"] == model.num_parameters()
    weights = sum(m.weight.size for m in model.modules() if isinstance(m, nn.Linear))
    zeros = sum(int((m.weight.data == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    assert zeros / weights == pytest.approx(0.75, abs=1e-3)
    assert info["sparsity"] == pytest.approx(zeros / model.num_parameters())
    w3 = quant.quantize_weights(model, bits=3, group_size=32)
    no.io.save(w3, tmp_path / "w3.npz")
    info = inspect_file(tmp_path / "w3.npz")
    packed = [t for t in info["tensors"] if t["name"].endswith("weight_packed")]
    assert packed and all(t["bits"] == 3 and t["dtype"] == "int4 (packed)" for t in packed)   # from the description
    assert sum(t["elements"] for t in packed) == weights                                     # codes, not bytes
    codes = sum(int((m.codes() == 0).sum()) for m in w3.modules() if hasattr(m, "codes"))
    assert sum(t["zeros"] for t in packed) == codes >= zeros                                 # pruned zeros stay
    assert info["stored_bytes"] < 0.2 * model.num_parameters() * 4


@pytest.mark.parametrize("name", ["digits_cnn.pth", "tensors_legacy.pth", "digits_cnn.onnx"])
def test_inspect_command_on_fixtures(capsys, name):
    if name.endswith(".onnx"):
        pytest.importorskip("onnx", reason="reading ONNX needs the optional extra 'onnx'")
    assert main(["inspect", os.path.join(FIXTURES, name)]) == 0
    out = capsys.readouterr().out
    assert "total:" in out and "bytes stored" in out
    if name == "digits_cnn.pth":
        assert "total: 1,931 elements in 11 tensors, 7,728 bytes stored" in out
    if name.endswith(".onnx"):
        assert "Conv x2" in out


def test_inspect_int4_onnx_counts_half_bytes(tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the optional extra 'onnx'")
    no.manual_seed(0)
    model = models.lenet_300_100(in_features=64)
    w4a8 = quant.quantize_static(model, np.random.default_rng(0).random((16, 64), np.float32),
                                 quant.QuantConfig(weight=quant.weight_spec(4)), progress=False)
    no.onnx.export(w4a8, tmp_path / "w4a8.onnx", np.zeros((1, 64), np.float32))
    info = inspect_file(tmp_path / "w4a8.onnx")
    codes = [t for t in info["tensors"] if t["name"].endswith("weight_q")]
    assert all(t["bits"] == 4 and t["bytes"] == -(-t["elements"] // 2) for t in codes)
