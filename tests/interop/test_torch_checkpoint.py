"""PyTorch checkpoints read without torch: exact tensors, every layout, and nothing executed from the file.

The committed fixtures (written by ``torch_digits_cnn.py`` beside this file) test the reader without torch; where
torch is installed the same properties are checked on checkpoints torch writes during the test.
"""

import io as stdio
import os
import pickle
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_digits_cnn import FIXTURES, nanoopt_digits_cnn

import nanoopt as no
from nanoopt import data, io, nn
from nanoopt.interop.torch_pickle import UnsafeCheckpointError, load_torch_checkpoint
from nanoopt.nn.module import StateDictError


def fixture(name):
    return os.path.join(FIXTURES, name)


def zip_checkpoint(path, pickle_bytes, records=None, name="archive"):
    """A file laid out exactly like torch.save's zip format around ``pickle_bytes``."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/data.pkl", pickle_bytes)
        archive.writestr(f"{name}/byteorder", "little")
        for key, raw in (records or {}).items():
            archive.writestr(f"{name}/data/{key}", raw)
        archive.writestr(f"{name}/version", "3\n")
    return path


class _RunsShell:
    """Pickles to ``os.system(command)``: what a malicious checkpoint does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# ===================================================================== the committed fixtures (no torch needed)
@pytest.mark.parametrize("name", ["tensors.pth", "tensors_legacy.pth"])
def test_fixture_tensors_read_exactly_in_both_formats(name):
    expected = np.load(fixture("tensors_expected.npz"))
    state = io.load_torch(fixture(name))
    assert list(state) == [k for k in expected.files]
    for key in expected.files:
        assert state[key].dtype == expected[key].dtype, key
        assert state[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)
    assert state["float16"].dtype == np.float16 and state["int8"].dtype == np.int8
    assert state["bfloat16"].dtype == np.float32       # widened exactly
    assert state["transposed"].flags.c_contiguous      # strided views come back as ordinary arrays
    state["shared_a"][0, 0] = 99                       # shared storages come back as independent arrays
    assert state["shared_whole"][0] == 0


def test_fixture_cnn_reproduces_torch_outputs_within_1e5():
    checkpoint = load_torch_checkpoint(fixture("digits_cnn.pth"))
    assert set(checkpoint) == {"state_dict", "epoch", "test_accuracy"}
    state = io.load_torch(fixture("digits_cnn.pth"))      # unwraps {"state_dict": ...}
    expected = np.load(fixture("digits_cnn_expected.npz"))
    for key, value in state.items():
        np.testing.assert_array_equal(value, expected[f"sd/{key}"], err_msg=key)
    model = nanoopt_digits_cnn()
    assert model.load_state_dict(state) == ([], [])
    images, labels = data.load_digits("test")
    with no.no_grad():
        logits = model.eval()(images).data
    np.testing.assert_allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    assert (logits.argmax(1) == expected["logits"].argmax(1)).all()
    assert abs((logits.argmax(1) == labels).mean() - checkpoint["test_accuracy"]) < 1e-12


def test_wrappers_keys_and_prefixes(tmp_path):
    state = io.load_torch(fixture("digits_cnn.pth"))
    assert list(io.load_torch(fixture("digits_cnn.pth"), key="state_dict")) == list(state)
    with pytest.raises(KeyError, match="has no entry 'weights'.*state_dict"):
        io.load_torch(fixture("digits_cnn.pth"), key="weights")
    with pytest.raises(ValueError, match="holds no state dict.*tensors"):
        # a dict of dicts without a wrapper key we know
        io.load_torch(_pickled_zip(tmp_path / "nested.pth", {"tensors": {"a": 1}}))


def _pickled_zip(path, obj):
    return zip_checkpoint(path, pickle.dumps(obj, protocol=2))


# ===================================================================== nothing from the file runs
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_a_pickle_calling_os_system_is_refused_and_nothing_runs(tmp_path, fmt):
    marker = tmp_path / "pwned"
    payload = {"weight": _RunsShell(f"touch {marker}")}
    path = tmp_path / f"evil_{fmt}.pth"
    if fmt == "zip":
        zip_checkpoint(path, pickle.dumps(payload, protocol=2))
    else:
        buffer = stdio.BytesIO()
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, payload, []):
            pickle.dump(part, buffer, protocol=2)
        path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeCheckpointError, match=r"asks for (posix|os)\.system.*nothing from the file was run"):
        io.load_torch(path)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"),
                                          ("numpy", "load"), ("torch", "load"), ("torch.nn.modules.linear", "Linear"),
                                          ("torch._utils", "_rebuild_qtensor"), ("collections", "defaultdict")])
def test_every_other_global_is_refused_by_name(tmp_path, module, name):
    body = f"c{module}\n{name}\n)R.".encode()
    path = zip_checkpoint(tmp_path / "other.pth", b"\x80\x02" + body)
    with pytest.raises(UnsafeCheckpointError, match=f"asks for {module}.{name}"):
        io.load_torch(path)


# ===================================================================== bad files
def test_bad_files_raise_clear_errors(tmp_path):
    good = open(fixture("digits_cnn.pth"), "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.pth"):
        io.load_torch(truncated)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        io.load_torch(junk)
    # a zip whose pickle names a storage record that is not there
    with zipfile.ZipFile(fixture("digits_cnn.pth")) as archive:
        records = {n: archive.read(n) for n in archive.namelist()}
    missing = tmp_path / "missing.pth"
    with zipfile.ZipFile(missing, "w") as archive:
        for name, raw in records.items():
            if not name.endswith("/data/3"):
                archive.writestr(name, raw)
    with pytest.raises(ValueError, match=r"storage '3' but the archive has no record 'digits_cnn/data/3'"):
        io.load_torch(missing)
    # a record shorter than the storage it should hold
    short = tmp_path / "short.pth"
    with zipfile.ZipFile(short, "w") as archive:
        for name, raw in records.items():
            archive.writestr(name, raw[:4] if name.endswith("/data/0") else raw)
    with pytest.raises(ValueError, match="storage needs 288 bytes"):
        io.load_torch(short)


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    source = open(fixture("tensors.pth"), "rb").read()
    with zipfile.ZipFile(stdio.BytesIO(source)) as archive:
        records = {n: archive.read(n) for n in archive.namelist()}
    pkl = next(n for n in records if n.endswith("data.pkl"))
    prefix = pkl[: -len("data.pkl")]
    # claim 3 float16 elements where 1 is stored: rewrite the storage record of 'float16' to 2 bytes
    key = _first_storage_key(records[pkl])
    path = tmp_path / "past.pth"
    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in records.items():
            archive.writestr(name, raw[:2] if name == f"{prefix}data/{key}" else raw)
    with pytest.raises(ValueError, match="storage needs"):
        io.load_torch(path)


def test_a_tiny_file_cannot_demand_a_huge_array(tmp_path):
    # one float viewed with stride 0 as 2^40 elements
    body = (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
            b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQK\x00\x8a\x06\x00\x00"
            b"\x00\x00\x00\x01\x85K\x00\x85\x89ccollections\nOrderedDict\n)RtRs.")
    path = zip_checkpoint(tmp_path / "bomb.pth", body, {"0": np.float32(1).tobytes()})
    with pytest.raises(ValueError, match="refusing to materialise"):
        io.load_torch(path)


def _first_storage_key(pickle_bytes):
    import pickletools

    for opcode, arg, _ in pickletools.genops(pickle_bytes):
        if opcode.name == "BINUNICODE" and arg.isdigit():
            return arg
    raise AssertionError("no storage key")


# ===================================================================== loading into a model
def test_load_state_dict_reports_every_problem_at_once_and_loads_nothing():
    model = nanoopt_digits_cnn()
    before = model.state_dict()
    state = io.load_torch(fixture("digits_cnn.pth"))
    del state["1.running_var"]                              # missing
    state["9.weight"] = np.zeros((1,), np.float32)          # unexpected
    state["8.weight"] = state["8.weight"][:, :32]           # shape mismatch
    state["4.bias"] = np.full(16, np.nan, np.float32)       # bad values
    with pytest.raises(StateDictError) as caught:
        model.load_state_dict(state)
    message = str(caught.value)
    assert "missing keys ['1.running_var']" in message and "unexpected keys ['9.weight']" in message
    assert "'8.weight' has shape (10, 32) in the checkpoint but (10, 64) in the model" in message
    assert "'4.bias' contains NaN" in message and "nothing was loaded" in message
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, ValueError)
    for key, value in before.items():
        np.testing.assert_array_equal(model.state_dict()[key], value, err_msg=key)


# ===================================================================== against torch itself
torch_dtypes = ["float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool"]


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(torch_dtypes), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       permute=st.booleans(), step=st.integers(1, 2), offset=st.integers(0, 2), legacy=st.booleans(),
       wrapper=st.sampled_from([None, "state_dict", "model"]))
def test_whatever_torch_writes_reads_back_exactly(tmp_path_factory, dtype, shape, permute, step, offset, legacy,
                                                 wrapper):
    torch = pytest.importorskip("torch", reason="torch writes the checkpoints in this test")
    n = int(np.prod(shape))
    full = (torch.randn(offset + n * step + 3) * 50).to(getattr(torch, dtype))
    strides = [step]
    for size in reversed(shape[1:]):
        strides.insert(0, strides[0] * size)
    base = torch.as_strided(full, shape, strides, offset)            # a strided view into one shared storage
    view = base.permute(*reversed(range(base.ndim))) if permute else base
    state = {"view": view, "base": base, "whole": full}
    path = tmp_path_factory.mktemp("ck") / "t.pth"
    torch.save({wrapper: state, "epoch": 1} if wrapper else state, path, _use_new_zipfile_serialization=not legacy)
    loaded = io.load_torch(path)
    for key, tensor in state.items():
        want = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        assert loaded[key].dtype == want.dtype and loaded[key].shape == want.shape
        np.testing.assert_array_equal(loaded[key], want)


@pytest.mark.slow
def test_torch_trained_cnn_matches_torch_within_1e5(tmp_path):
    torch = pytest.importorskip("torch", reason="trains the CNN with torch")
    from torch_digits_cnn import train_torch_digits_cnn

    reference = train_torch_digits_cnn(epochs=3, seed=1)
    torch.save({"model": reference.state_dict(), "optimizer": {"lr": 0.05}}, tmp_path / "cnn.pth")
    model = nanoopt_digits_cnn()
    model.load_state_dict(io.load_torch(tmp_path / "cnn.pth"))
    images, _ = data.load_digits("test")
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    with no.no_grad():
        np.testing.assert_allclose(model.eval()(images).data, expected, rtol=1e-5, atol=1e-5)


def test_torch_saved_whole_module_is_refused_naming_the_class(tmp_path):
    torch = pytest.importorskip("torch", reason="torch pickles the module")
    marker = tmp_path / "ran"
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear.*state_dict\(\)"):
        io.load_torch(tmp_path / "module.pth")
    torch.save({"w": torch.ones(1), "evil": _RunsShell(f"touch {marker}")}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        io.load_torch(tmp_path / "evil.pth")
    assert not marker.exists()


def test_module_layers_load_by_pytorch_names():
    # every nanoopt layer in the CNN uses PyTorch's parameter and buffer names
    assert list(nanoopt_digits_cnn().state_dict()) == list(io.load_torch(fixture("digits_cnn.pth")))
    assert isinstance(nanoopt_digits_cnn()[6], nn.AvgPool2d)


def test_int8_ptq_of_the_torch_trained_cnn_keeps_accuracy_within_0_3_points():
    from nanoopt import quant

    model = nanoopt_digits_cnn()
    model.load_state_dict(io.load_torch(fixture("digits_cnn.pth")))
    train, test = data.load_digits("train"), data.load_digits("test")
    float_accuracy = no.evaluate(model.eval(), test)["accuracy"]
    int8 = quant.quantize_static(model, train[0][:256], progress=False)
    assert abs(no.evaluate(int8, test)["accuracy"] - float_accuracy) <= 0.003


@pytest.mark.parametrize("body", [
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R.",                       # wrong number of arguments
    b"\x80\x02ccollections\nOrderedDict\n(K\x01tR.",                          # OrderedDict(1)
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x01K\x00)K\x00tR.",      # no storage
    b"\x80\x02(X\x07\x00\x00\x00storageQ.",                                  # malformed persistent id
])
def test_malformed_pickles_are_value_errors(tmp_path, body):
    path = zip_checkpoint(tmp_path / "bad.pth", body)
    with pytest.raises(ValueError, match="bad.pth"):
        io.load_torch(path)
