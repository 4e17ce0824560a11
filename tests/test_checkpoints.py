"""Checkpoints of every model kind nanoopt makes: a round trip is bit-identical, a mismatch is refused by name.

The catalogue ``KINDS`` builds each kind from a seed (float, pruned with masks, pruned then removed, shrunk,
sparse CSR and N:M, dynamic int8/int4, weight-only 2-8 bit, static int8 / 16x8 / 16x16 / W4A8, pruned then
quantized, prepared (calibrated) models, QAT with observer / LSQ / PACT quantizers and folded BatchNorm). The
property test saves one model of a kind and loads it into another model of that kind built from a different
seed: the outputs must then be the same bits. The cross test loads every kind's checkpoint into every other
kind's model: each load must raise, naming the first key that differs and both sides, and leave the model
unchanged -- except for the pairs of kinds that really are one format (``SAME_FORMAT``).
"""

import copy
import functools
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import data, io, nn, prune, quant, report
from nanoopt.quant.config import INT16_ACTIVATION, weight_spec
from nanoopt.quant.observers import MinMaxObserver
from nanoopt.quant.packing import pack_int4, unpack_int4

SHAPE = (1, 8, 8)


def base(seed):
    """A small Conv-BN-ReLU-Linear-ReLU-Linear model with non-trivial BatchNorm statistics (eval mode)."""
    no.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 16),
                          nn.ReLU(), nn.Linear(16, 10))
    rng = np.random.default_rng(seed)
    bn = model[1]
    bn.running_mean[...] = rng.normal(scale=0.3, size=4)
    bn.running_var[...] = rng.uniform(0.5, 2.0, size=4)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, size=4)
    return model.eval()


def inputs(seed, batch=8):
    return np.random.default_rng(seed).uniform(size=(batch,) + SHAPE).astype(np.float32)


def pruned(seed, amount=0.7):
    model = base(seed)
    for index in (4, 6):
        prune.l1_unstructured(model[index], "weight", amount=amount)
    return model


def shrunk(seed):
    model = base(seed)
    prune.ln_structured(model[4], "weight", amount=0.5, n=1, dim=0)
    prune.shrink(model, inputs(seed, 1))
    return model


def sparse(seed, layout):
    model = base(seed)
    for index in (4, 6):
        if layout == "nm":
            prune.nm_sparsity(model[index], "weight", n=2, m=4)
        else:  # a different number of non-zeros for every seed
            prune.l1_unstructured(model[index], "weight", amount=0.6 + 0.3 * np.random.default_rng(seed).random())
    prune.to_sparse(model, min_sparsity=0.5, format=layout)
    return model


def static(seed, config, model=None):
    model = base(seed) if model is None else model
    return quant.quantize_static(model, inputs(seed + 1, 32), config, progress=False)


@functools.cache
def digits():
    return data.load_digits("train")


def qat(seed, weight_quantizer, activation_quantizer, frozen):
    train_x, train_y = digits()
    model = quant.prepare_qat(base(seed), example_input=train_x[:1], weight_quantizer=weight_quantizer,
                              activation_quantizer=activation_quantizer)
    no.manual_seed(seed)
    no.fit(model, (train_x[:64], train_y[:64]), epochs=1, batch_size=32, lr=0.01, progress=False)
    if frozen:
        quant.set_observers(model, False)
        quant.freeze_batchnorm(model)
    return model


def calibrated(seed, config, freeze):
    """A prepared model after calibration, frozen or still observing (histogram / MSE observer statistics)."""
    model = base(seed)
    prepared = quant.prepare(model, config, inputs(seed, 1))
    return quant.calibrate(prepared, [inputs(seed + 1, 16), inputs(seed + 2, 16)], progress=False, freeze=freeze)


def removed(seed):
    return prune.remove_all(pruned(seed))


KINDS = {
    "float": base,
    "pruned-masks": pruned,
    "pruned-removed": removed,
    "shrunk": shrunk,
    "sparse-csr": lambda seed: sparse(seed, "csr"),
    "sparse-nm": lambda seed: sparse(seed, "nm"),
    "dynamic-int8": lambda seed: quant.quantize_dynamic(base(seed), bits=8),
    "dynamic-int4": lambda seed: quant.quantize_dynamic(base(seed), bits=4),
    "weight-only-2": lambda seed: quant.quantize_weights(base(seed), bits=2),
    "weight-only-3": lambda seed: quant.quantize_weights(base(seed), bits=3),
    "weight-only-4-group16": lambda seed: quant.quantize_weights(base(seed), bits=4, group_size=16),
    "weight-only-4": lambda seed: quant.quantize_weights(base(seed), bits=4),
    "weight-only-5": lambda seed: quant.quantize_weights(base(seed), bits=5),
    "weight-only-6": lambda seed: quant.quantize_weights(base(seed), bits=6),
    "weight-only-7": lambda seed: quant.quantize_weights(base(seed), bits=7),
    "weight-only-8": lambda seed: quant.quantize_weights(base(seed), bits=8),
    "int8": lambda seed: static(seed, quant.QuantConfig()),
    "int8-per-tensor": lambda seed: static(seed, quant.QuantConfig(weight=weight_spec(8, per_channel=False))),
    "16x8": lambda seed: static(seed, quant.QuantConfig.int16_activations()),
    "16x16": lambda seed: static(seed, quant.QuantConfig(activation=INT16_ACTIVATION, weight=weight_spec(16),
                                                         activation_observer=MinMaxObserver)),
    "w4a8": lambda seed: static(seed, quant.QuantConfig.weights4()),
    "w3a8": lambda seed: static(seed, quant.QuantConfig(weight=weight_spec(3))),
    "pruned-int8": lambda seed: static(seed, quant.QuantConfig(), pruned(seed)),
    "prepared-int8-observing": lambda seed: calibrated(seed, quant.QuantConfig(), freeze=False),
    "prepared-w4a8": lambda seed: calibrated(seed, quant.QuantConfig.weights4(), freeze=True),
    "qat-observer": lambda seed: qat(seed, "observer", "observer", frozen=False),
    "qat-observer-frozen": lambda seed: qat(seed, "observer", "observer", frozen=True),
    "qat-lsq": lambda seed: qat(seed, "lsq", "lsq", frozen=False),
    "qat-pact": lambda seed: qat(seed, "observer", "pact", frozen=False),
}

# kinds that are one format: a pruned model whose masks were removed is a float model; a pruned model quantized is
# an int8 model; a QAT model with frozen observers is a QAT model whose switches are set another way (the
# switches are state, and a checkpoint carries them: loading sets them)
SAME_FORMAT = [{"float", "pruned-removed"}, {"int8", "pruned-int8"}, {"qat-observer", "qat-observer-frozen"}]


def outputs(model, x):
    model.eval()
    with no.no_grad():
        return model(no.Tensor(x)).data


def snapshot(model):
    return {key: value.copy() for key, value in model.state_dict().items()}


# ===================================================================== round trips, every kind
# QAT kinds train two steps through ``fit`` per example: marked slow as every training test is (kept in the default run)
KIND_PARAMS = [pytest.param(kind, marks=pytest.mark.slow) if kind.startswith("qat") else kind for kind in sorted(KINDS)]


@pytest.mark.parametrize("kind", KIND_PARAMS)
@settings(max_examples=4, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 2**16), st.integers(1, 9))
def test_every_kind_round_trips_bit_for_bit(tmp_path_factory, kind, seed, offset, batch):
    source, target = KINDS[kind](seed), KINDS[kind](seed + offset)
    path = tmp_path_factory.mktemp("kind") / "model.npz"
    io.save(source, path)
    assert io.load_into(target, path) == ([], [])
    x = inputs(seed + 2, batch)
    for _ in range(2):  # twice: quantizers that still observe must have restored their statistics too
        expected, restored = outputs(source, x), outputs(target, x)
        assert restored.dtype == expected.dtype
        np.testing.assert_array_equal(restored, expected)
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[key], value, err_msg=key)
        assert target.state_dict()[key].dtype == value.dtype, key


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    built = {}
    for kind, make in KINDS.items():
        model = make(11)
        io.save(model, folder / f"{kind}.npz")
        built[kind] = (model, folder / f"{kind}.npz")
    return built


@pytest.mark.slow  # builds QAT kinds, which train two steps through fit
def test_no_kind_loads_into_another_kind(catalogue):
    accepted, targets = [], {kind: make(23) for kind, make in KINDS.items()}
    for source_kind, (_, path) in catalogue.items():
        for target_kind in KINDS:
            if target_kind == source_kind or {source_kind, target_kind} in SAME_FORMAT:
                continue
            target = copy.deepcopy(targets[target_kind])
            before = snapshot(target)
            try:
                io.load_into(target, path)
            except (KeyError, ValueError, TypeError) as error:
                message = error.args[0]
                assert str(path) in message and re.search(r"'[\w.]+'", message), message
                assert ("missing keys" in message or "unexpected keys" in message
                        or ("in the checkpoint" in message and "in the model" in message)), message
            else:
                accepted.append(f"{source_kind} -> {target_kind}")
                continue
            after = target.state_dict()
            assert list(after) == list(before)
            for key, value in before.items():
                np.testing.assert_array_equal(after[key], value, err_msg=f"{source_kind} -> {target_kind}: {key}")
    assert accepted == [], f"silently accepted: {accepted}"


@pytest.mark.slow  # builds QAT kinds, which train two steps through fit
def test_same_format_kinds_do_load_into_each_other(catalogue):
    for pair in SAME_FORMAT:
        first, second = sorted(pair)
        target = KINDS[second](5)
        io.load_into(target, catalogue[first][1])
        np.testing.assert_array_equal(outputs(target, inputs(3)), outputs(catalogue[first][0], inputs(3)))


def test_a_different_architecture_is_refused_naming_the_key_and_both_shapes(catalogue, tmp_path):
    no.manual_seed(0)
    wider = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 32),
                          nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match=r"'4.weight' has shape \(16, 144\) in the checkpoint but \(32, 144\)"):
        io.load_into(wider, catalogue["float"][1])
    int8_wider = quant.quantize_static(wider, inputs(1, 16), progress=False)
    with pytest.raises(ValueError, match=r"'model.4.weight' has shape \(16, 144\) in the checkpoint but \(32, 144\)"):
        io.load_into(int8_wider, catalogue["int8"][1])


# ===================================================================== defect 1: sparse models keep their weights
@pytest.mark.parametrize("layout", ["csr", "nm"])
def test_sparse_models_save_their_weights_and_load_into_another_sparse_model(tmp_path, layout):
    source, target = sparse(1, layout), sparse(2, layout)
    if layout == "csr":
        assert source[4].sparse_weight.nnz != target[4].sparse_weight.nnz  # loading must resize
    path = tmp_path / "sparse.npz"
    io.save(source, path)
    assert {"4.weight_shape", "6.bias"} <= set(io.load(path))
    assert io.load_into(target, path) == ([], [])
    x = inputs(4)
    np.testing.assert_array_equal(outputs(target, x), outputs(source, x))
    stored = sum(m.sparse_weight.nnz if layout == "csr" else m.sparse_weight.values.size
                 for m in (source[4], source[6]))
    dense = source[0].weight.size + source[0].bias.size + 2 * 4
    assert report.count_parameters(source) == dense + stored + 16 + 10  # BN: weight, bias; Linear biases
    sparse_weights = [m.sparse_weight for m in (source[4], source[6])]
    zeros = sum(w.shape[0] * w.shape[1] - np.count_nonzero(w.data if layout == "csr" else w.values)
                for w in sparse_weights)
    total = sum(w.shape[0] * w.shape[1] for w in sparse_weights) + source[0].weight.size
    assert report.weight_sparsity(source) == pytest.approx((zeros + np.sum(source[0].weight.data == 0)) / total)


def test_an_invalid_sparse_structure_is_refused_before_anything_changes():
    source, target = sparse(1, "csr"), sparse(2, "csr")
    state = source.state_dict()
    state["4.weight_indices"] = state["4.weight_indices"].copy()
    state["4.weight_indices"][0] = 144  # a column that does not exist
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"layer '4' \(SparseLinear\): CSRMatrix: column indices must be in "
                                         r"\[0, 144\)"):
        target.load_state_dict(state)
    for key, value in before.items():
        np.testing.assert_array_equal(target.state_dict()[key], value)
    nm_source, nm_target = sparse(1, "nm"), sparse(2, "nm")
    state = nm_source.state_dict()
    state["4.weight_nm"] = np.array([1, 2], np.int64)
    with pytest.raises(ValueError, match="an 1:2 sparse weight does not load into a 2:4 layer"):
        nm_target.load_state_dict(state)


def test_report_counts_what_each_kind_stores(catalogue):
    float_count = report.count_parameters(catalogue["float"][0])
    for kind in ("dynamic-int8", "weight-only-3", "weight-only-8", "int8", "16x16", "w4a8"):
        assert report.count_parameters(catalogue[kind][0]) == float_count - 2 * 4 * (kind in ("int8", "16x16",
                                                                                              "w4a8")), kind
    csr = catalogue["sparse-csr"][0]
    assert report.count_parameters(csr) == float_count - 144 * 16 - 16 * 10 + csr[4].weight_data.size + \
        csr[6].weight_data.size


# ===================================================================== defect 2: nothing is cast silently
def test_a_16x8_checkpoint_does_not_load_into_an_int8_model(catalogue):
    with pytest.raises(ValueError, match=r"'input_scale' is described differently: bits=16, symmetric=True in the "
                                         r"checkpoint but bits=8, symmetric=False in the model"):
        io.load_into(KINDS["int8"](3), catalogue["16x8"][1])
    int8 = KINDS["int8"](3)
    state = catalogue["16x8"][0].state_dict()
    state.metadata = None  # even without the descriptions, int64 biases never wrap into int32 ones
    with pytest.raises(TypeError, match=r"'model.0.bias' is int64 in the checkpoint but int32 in the model"):
        int8.load_state_dict(state)


def test_a_4_bit_weight_only_checkpoint_does_not_load_into_a_3_bit_model(catalogue):
    with pytest.raises(ValueError, match=r"'0.weight_packed' is described differently: bits=4 in the checkpoint "
                                         r"but bits=3 in the model"):
        io.load_into(KINDS["weight-only-3"](3), catalogue["weight-only-4"][1])
    plain = dict(catalogue["weight-only-4"][0].state_dict())  # a plain dict: no descriptions, the codes are checked
    with pytest.raises(ValueError, match=r"weight_packed \(3-bit\) holds codes in \[-7, 7\], outside the layer's "
                                         r"range \[-3, 3\]"):
        KINDS["weight-only-3"](3).load_state_dict(plain)


def test_int64_and_float_values_do_not_load_into_int8_codes(catalogue):
    model = catalogue["int8"][0]
    state = dict(model.state_dict())
    for wrong in (state["model.4.weight"].astype(np.int64), state["model.4.weight"].astype(np.float32)):
        with pytest.raises(TypeError, match=rf"'model.4.weight' is {wrong.dtype} in the checkpoint but int8"):
            KINDS["int8"](4).load_state_dict({**state, "model.4.weight": wrong})


def test_codes_outside_the_bit_width_are_refused():
    model = KINDS["w4a8"](3)
    state = dict(model.state_dict())
    key = next(k for k in state if k.endswith("weight_packed"))
    layer = model.get_submodule(key.rsplit(".", 1)[0])
    codes = unpack_int4(state[key], layer.weight.size)
    codes[0] = -8  # a 4-bit layer stores [-7, 7]
    with pytest.raises(ValueError, match=r"holds codes in \[-8, 7\], outside the layer's range \[-7, 7\]"):
        KINDS["w4a8"](4).load_state_dict({**state, key: pack_int4(codes)})


def test_only_lossless_casts_happen():
    model = nn.Linear(2, 1)
    model.load_state_dict({"weight": np.array([[0.5, 0.25]]), "bias": np.array([1.0])})  # exact float32 values
    assert model.weight.dtype == np.float32
    with pytest.raises(TypeError, match=r"'weight' is float64 in the checkpoint but float32"):
        model.load_state_dict({"weight": np.array([[0.1, 0.25]]), "bias": np.array([1.0])})
    with pytest.raises(TypeError, match=r"'bias' is float64 in the checkpoint but float32"):
        model.load_state_dict({"weight": np.array([[0.5, 0.25]]), "bias": np.array([1e300])})
    with pytest.raises(TypeError, match=r"'weight' is int64 in the checkpoint but float32"):
        model.load_state_dict({"weight": np.array([[1, 2]]), "bias": np.array([1.0])})
    bn = nn.BatchNorm1d(2)
    bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": np.array(3, np.int32)})  # int widening
    assert bn.num_batches_tracked.dtype == np.int64 and int(bn.num_batches_tracked) == 3
    with pytest.raises(TypeError, match=r"'num_batches_tracked' is uint64 in the checkpoint but int64"):
        bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": np.array(3, np.uint64)})


# ===================================================================== defect 4: QAT checkpoints
@pytest.mark.slow  # trains two QAT steps through fit
@pytest.mark.parametrize("frozen", [False, True])
def test_a_qat_checkpoint_restores_switches_and_observer_statistics(tmp_path, frozen):
    source = KINDS["qat-observer-frozen" if frozen else "qat-observer"](1)
    quant.set_fake_quant(source, False, kind="weight")  # a switch away from its default
    path = tmp_path / "qat.npz"
    io.save(source, path)
    target = KINDS["qat-observer"](2)  # observing, rounding everywhere
    io.load_into(target, path)
    for mine, theirs in zip(quant.quantizers(target), quant.quantizers(source), strict=True):
        assert (mine.observer_enabled, mine.fake_quant_enabled) == (theirs.observer_enabled, theirs.fake_quant_enabled)
        assert mine.observer.n_batches_seen_ == theirs.observer.n_batches_seen_
    assert [m.bn_frozen for m in target.modules() if hasattr(m, "bn_frozen")] == [frozen]
    x = inputs(7, 16)
    for mode in ("eval", "train", "eval"):  # train mode: batch statistics, observers and BN running stats move
        getattr(source, mode)(), getattr(target, mode)()
        np.testing.assert_array_equal(target(no.Tensor(x)).data, source(no.Tensor(x)).data)
    np.testing.assert_array_equal(outputs(quant.convert(target), x), outputs(quant.convert(source), x))


OBSERVERS = {
    "minmax": lambda: MinMaxObserver(),
    "moving-average": lambda: quant.MovingAverageMinMaxObserver(averaging_constant=0.3),
    "per-channel": lambda: quant.PerChannelMinMaxObserver(),
    "moving-average-per-channel": lambda: quant.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.3),
    "mse": lambda: quant.PerChannelMSEObserver(weight_spec(4), num_candidates=10),
    "histogram": lambda: quant.HistogramObserver(bins=64),
    "percentile": lambda: quant.PercentileObserver(percentile=99.0, bins=64),
    "entropy": lambda: quant.EntropyObserver(bins=64),
}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(OBSERVERS)), st.integers(0, 3), st.integers(0, 2**16))
def test_observer_statistics_round_trip_exactly(name, batches, seed):
    rng = np.random.default_rng(seed)
    data_batches = [rng.normal(size=(4, 6)) * rng.uniform(0.1, 10.0) for _ in range(batches + 1)]
    source = OBSERVERS[name]()
    for batch in data_batches[:batches]:
        source.partial_fit(batch)
    state = source.state_arrays()
    restored = OBSERVERS[name]().fit(rng.normal(size=(4, 6)) * 50).load_state_arrays(state)  # overwrites
    for observer in (source, restored):
        observer.partial_fit(data_batches[-1])
    np.testing.assert_array_equal(restored.scale_, source.scale_)
    np.testing.assert_array_equal(restored.zero_point_, source.zero_point_)
    assert restored.n_batches_seen_ == source.n_batches_seen_ == batches + 1


def test_observer_state_of_another_dtype_or_shape_is_refused():
    state = quant.PerChannelMinMaxObserver().fit(np.ones((3, 2))).state_arrays()
    with pytest.raises(ValueError, match=r"'min': expected float64 with 1 axes, got float32"):
        quant.PerChannelMinMaxObserver().load_state_arrays({**state, "min": state["min"].astype(np.float32)})
    with pytest.raises(ValueError, match="needs entries"):
        quant.HistogramObserver().load_state_arrays(state)


# ===================================================================== defect 8: io refuses what it cannot read back
def test_save_refuses_nan_and_inf_naming_the_key(tmp_path):
    model = base(0)
    model[4].weight.data[2, 3] = np.inf
    with pytest.raises(ValueError, match=r"save: '4.weight' contains NaN or Inf \(1 of 2304 values\)"):
        io.save(model, tmp_path / "bad.npz")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"save: 'x' contains NaN"):
        io.save({"x": np.array([np.nan])}, tmp_path / "bad.npz")


def test_save_takes_a_module_or_a_dict(tmp_path):
    with pytest.raises(TypeError, match="expected a nanoopt Module or a dict of arrays keyed by name, got list"):
        io.save([np.ones(2)], tmp_path / "list.npz")
    with pytest.raises(TypeError, match="keys must be str, got 0"):
        io.save({0: np.ones(2)}, tmp_path / "int_keys.npz")


@pytest.mark.parametrize(("write", "says"), [
    (lambda path: np.save(path, np.ones(3)), r"a single NumPy array \(\.npy"),
    (lambda path: path.write_text("weight,bias\n1,2\n"), r"a text file \(it starts with 'weight,bias"),
    (lambda path: path.write_bytes(b"\x80\x04\x95 pickled"), r"a Python pickle stream"),
    (lambda path: path.write_bytes(b""), r"an empty file"),
    (lambda path: path.write_bytes(b"\x00\xff\x10binary"), r"a binary file of an unknown format"),
])
def test_load_says_what_a_file_is_and_never_suggests_unpickling(tmp_path, write, says):
    path = tmp_path / "not_a_checkpoint.npz"
    write(path)
    if not path.exists():  # np.save appends .npy
        path = tmp_path / "not_a_checkpoint.npz.npy"
    with pytest.raises(ValueError, match=says) as caught:
        io.load(path)
    message = str(caught.value)
    assert "not a nanoopt checkpoint" in message and "allow_pickle" not in message and "pickle.load" not in message


def test_checkpoints_record_the_descriptions_and_version_1_files_still_load(tmp_path, catalogue):
    described = io.descriptions(catalogue["w4a8"][1])
    assert described["input_scale"]["bits"] == 8 and described["model.0.weight_packed"]["packed"] is True
    assert io.descriptions(catalogue["float"][1]) == {}
    assert io.descriptions(catalogue["sparse-nm"][1])["4.weight_values"] == {"sparse": "n:m", "n": 2, "m": 4}
    model = base(1)
    header = json.dumps({"format": io.FORMAT_NAME, "version": 1, "keys": list(model.state_dict())})
    np.savez(tmp_path / "v1.npz", **model.state_dict(), __nanoopt__=np.frombuffer(header.encode(), np.uint8))
    target = base(2)
    io.load_into(target, tmp_path / "v1.npz")
    np.testing.assert_array_equal(outputs(target, inputs(1)), outputs(model, inputs(1)))
