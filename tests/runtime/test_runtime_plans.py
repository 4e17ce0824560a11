"""nanoopt.runtime plans: bit-identical to the converted integer model, close to the float model, loadable from a
file, strict about their input, and importable without the autograd.

The central property: for every kind of model the runtime takes -- MLPs, convolutions (grouped, strided, dilated,
padded), max/average/adaptive pools, residual adds, 16x8 activations, 4-bit weights, pruned models on CSR and N:M
kernels, physically shrunk models -- ``runtime.compile(qmodel)(x)`` equals ``qmodel(x)`` bit for bit, on any batch
size and for inputs far outside the calibrated range, and so does the plan saved and loaded again.
"""

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_testing import build_model, randomise_batchnorms

import nanoopt as no
from nanoopt import models, nn, prune, runtime
from nanoopt.deploy import to_plan
from nanoopt.prune.sparse import to_sparse
from nanoopt.quant.config import QuantConfig
from nanoopt.quant.ptq import calibrate, convert, prepare
from nanoopt.runtime import PlanFormatError
from nanoopt.runtime import float_kernels as fk
from nanoopt.runtime.plan import CHAINS
from nanoopt.runtime.steps import chain_calls


def build(architecture, seed):
    return build_model(architecture, seed, {
        # grouped, strided, dilated and padded convolutions, a max pool with padding
        "convs": lambda: (nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                                        nn.Conv2d(8, 4, 3, stride=1, padding=1, groups=4), nn.ReLU(),
                                        nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False),
                                        nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten(), nn.Linear(24, 3)),
                          (2, 7, 7)),
        # average pools with and without padding, dropout, an unfused ReLU
        "pools": lambda: (nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(3, stride=1, padding=1), nn.Dropout(0.3),
                                        nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(36, 4)), (1, 8, 8)),
    })


CONFIGS = {"int8": QuantConfig(), "16x8": QuantConfig.int16_activations(), "w4a8": QuantConfig.weights4(),
           "int7": QuantConfig.x86_reduce_range()}


def converted(model, shape, config, seed):
    rng = np.random.default_rng(seed)
    model.eval()
    calibration = [rng.normal(size=(16,) + shape).astype(np.float32) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prepared = prepare(model, CONFIGS[config], calibration[0][:1])
    calibrate(prepared, calibration, progress=False)
    return convert(prepared)


def roundtrip(plan):
    buffer = io.BytesIO()
    runtime.save(plan, buffer)
    buffer.seek(0)
    return runtime.load(buffer)


def bits(array):
    return np.ascontiguousarray(array, np.float32).view(np.uint32)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["mlp", "lenet5", "resnet", "convs", "pools"]), st.sampled_from(sorted(CONFIGS)),
       st.integers(0, 2**16), st.integers(1, 6), st.sampled_from([0.1, 1.0, 30.0]))
def test_integer_plan_equals_integer_model_bit_for_bit(architecture, config, seed, batch, spread):
    model, shape = build(architecture, seed)
    randomise_batchnorms(model, np.random.default_rng(seed))
    qmodel = converted(model, shape, config, seed)
    plan = runtime.compile(qmodel)
    x = (np.random.default_rng(seed + 1).normal(size=(batch,) + shape) * spread).astype(np.float32)
    expected = qmodel(x).data
    np.testing.assert_array_equal(bits(plan(x)), bits(expected))
    np.testing.assert_array_equal(bits(plan(x)), bits(expected))  # a second call reuses the buffers
    np.testing.assert_array_equal(bits(roundtrip(plan)(x)), bits(expected))
    np.testing.assert_array_equal(plan.forward_int(qmodel.quantize_input(x)),
                                  qmodel.forward_int(qmodel.quantize_input(x)))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["mlp", "lenet5", "resnet", "convs", "pools"]), st.integers(0, 2**16), st.integers(1, 6))
def test_float_plan_matches_float_model(architecture, seed, batch):
    model, shape = build(architecture, seed)
    randomise_batchnorms(model, np.random.default_rng(seed))
    model.eval()
    x = np.random.default_rng(seed + 1).normal(size=(batch,) + shape).astype(np.float32)
    plan = runtime.compile(model, x[:1])
    with no.no_grad():
        expected = model(x).data
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(plan(x), expected, rtol=0, atol=2e-5 * scale)
    np.testing.assert_array_equal(roundtrip(plan)(x), plan(x))
    ops = [step.op for step in plan.description.steps]
    if architecture == "resnet":  # BatchNorm folded into the convolutions, ReLUs fused
        assert "affine" not in ops and "relu" not in ops
    if architecture == "lenet5":  # conv -> ReLU -> 2x2 max pool: one step each
        assert ops == ["conv2d", "conv2d", "flatten", "linear", "linear", "linear"]
    if architecture == "convs":  # an overlapping, padded max pool stays a step of its own
        assert "max_pool" in ops


@pytest.mark.parametrize("architecture", ["mlp", "lenet5", "convs"])
def test_plans_built_on_each_backend_give_the_same_bits(architecture):
    """The backend is chosen when the plan is built (the thread's kernels.use_backend); every one gives the model's
    integers -- the portable Numba path is what CPUs without AVX2 run."""
    from nanoopt import kernels

    model, shape = build(architecture, 5)
    qmodel = converted(model, shape, "int8", 5)
    x = np.random.default_rng(6).normal(size=(7,) + shape).astype(np.float32)
    expected = qmodel(x).data
    for backend in ("numba", "reference", "auto"):
        with kernels.use_backend(backend):
            plan = runtime.compile(qmodel)
        np.testing.assert_array_equal(plan(x), expected)


@pytest.mark.parametrize("fmt", ["csr", "nm"])
def test_sparse_plans_match_the_sparse_model(fmt):
    no.manual_seed(1)
    model = models.lenet_300_100(in_features=64)
    if fmt == "csr":
        for layer in (model[1], model[3], model[5]):
            prune.l1_unstructured(layer, "weight", amount=0.9)
    else:
        for layer in (model[1], model[3], model[5]):
            prune.nm_sparsity(layer, "weight", n=2, m=4)
    replaced = to_sparse(model, format=fmt, n=2, m=4)
    assert replaced == ["1", "3", "5"]
    model.eval()
    plan = runtime.compile(model)
    assert {step.op for step in plan.description.steps} >= {f"{fmt}_linear"}
    for batch in (1, 3):
        x = np.random.default_rng(batch).random((batch, 1, 8, 8)).astype(np.float32)
        with no.no_grad():
            expected = model(x).data
        np.testing.assert_array_equal(plan(x), expected)  # the same sparse kernels, the same summation order


def test_shrunk_model_plans():
    no.manual_seed(2)
    model = models.lenet_300_100(in_features=64)
    prune.ln_structured(model[1], "weight", amount=0.5, n=1, dim=0)
    prune.ln_structured(model[3], "weight", amount=0.5, n=1, dim=0)
    x = np.random.default_rng(0).random((8, 1, 8, 8)).astype(np.float32)
    prune.shrink(model, x[:2])
    prune.remove_all(model)
    assert model[1].out_features == 150
    model.eval()
    with no.no_grad():
        expected = model(x).data
    np.testing.assert_allclose(runtime.compile(model)(x), expected, atol=1e-5)
    qmodel = converted(model, (1, 8, 8), "int8", 0)
    np.testing.assert_array_equal(runtime.compile(qmodel)(x), qmodel(x).data)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def int_plan():
    model, shape = build("lenet5", 0)
    return runtime.compile(converted(model, shape, "int8", 0))


def test_wrong_input_is_refused_before_any_kernel(int_plan):
    good = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 8, 8\), got \(2, 1, 8, 9\)"):
        int_plan(np.zeros((2, 1, 8, 9), np.float32))
    with pytest.raises(TypeError, match="floating point.*int64"):
        int_plan(good.astype(np.int64))
    with pytest.raises(TypeError, match="NumPy array, got list"):
        int_plan(good.tolist())
    for value in (np.nan, np.inf, -np.inf):  # refused, as the integer model refuses them
        bad = good.copy()
        bad[1, 0, 3, 3] = value
        with pytest.raises(ValueError, match=r"not finite.*\(1, 0, 3, 3\)"):
            int_plan(bad)
    np.testing.assert_array_equal(int_plan(good.astype(np.float64)), int_plan(good))
    assert int_plan(good[:0]).shape == (0, 10)  # no samples: no rows, as the models return


@pytest.mark.parametrize("kind", ["int", "float"])
def test_every_call_returns_a_new_array_that_no_later_call_touches(kind):
    """The outputs handed out are allocated ahead, in runs: each is the caller's own (owns its memory, shares none
    with the plan's buffers or with another output), and later calls -- more than one run of them -- leave it
    alone."""
    model, shape = build("lenet5", 3)
    model.eval()
    rng = np.random.default_rng(4)
    plan = runtime.compile(converted(model, shape, "int8", 3)) if kind == "int" else runtime.compile(model)
    inputs = [rng.normal(size=(2,) + shape).astype(np.float32) for _ in range(3)]
    expected = [plan(x).copy() for x in inputs]
    bound = plan._bound[inputs[0].shape]
    buffers = [bound.input, bound.output, *(a for _, arguments in bound.calls for a in arguments
                                             if isinstance(a, np.ndarray))]
    outputs = [plan(inputs[i % 3]) for i in range(2 * bound.refill + 3)]
    for i, out in enumerate(outputs):
        assert out.flags.owndata and out.base is None and out.dtype == np.float32
        np.testing.assert_array_equal(out, expected[i % 3])  # not overwritten by the calls after it
        assert not any(np.shares_memory(out, other) for other in outputs[:i] + buffers)


def test_a_padded_first_conv_reads_the_input_where_the_plan_writes_it():
    """The float plan copies its input straight into the zero-padded buffer of a first conv with padding (no
    buffer of its own, no second copy); its border stays zero over calls, and the results are the model's."""
    model, shape = build("lenet5", 2)
    model.eval()
    plan = runtime.compile(model)
    rng = np.random.default_rng(2)
    for _ in range(2):
        x = rng.normal(size=(3,) + shape).astype(np.float32) + 5.0  # no zeros: a border written would show
        with no.no_grad():
            expected = model(x).data
        np.testing.assert_allclose(plan(x), expected, rtol=0, atol=2e-5 * max(1.0, float(np.abs(expected).max())))
    bound = plan._bound[x.shape]
    padded = plan.ops[0].padded_inputs[x.shape]
    assert bound.input.base is padded and padded[:, :, 0].max() == 0 and padded[:, :, :, -1].max() == 0
    first = [function for function, _ in bound.per_step[0]]
    assert np.copyto not in first and len(first) == 1  # the conv itself, no copy before it
    assert np.copyto in [function for function, _ in bound.per_step[1]]  # the second conv reads a step's output


def test_profile_reports_every_part_of_a_call(int_plan):
    """``profile`` times plain and instrumented calls; it names its parts (no wall-clock bounds asserted) and leaves
    the outputs handed out before it untouched."""
    x = np.random.default_rng(5).normal(size=(4, 1, 8, 8)).astype(np.float32)
    before = int_plan(x)
    kept = before.copy()
    profile = int_plan.profile(x, repeats=3)
    assert set(profile) == {"whole", "kernels", "boundary", "overhead", "overhead_mean", "steps", "calls"}
    assert 0 < profile["boundary"] < profile["kernels"] and profile["whole"] > 0
    assert profile["calls"] == len(int_plan._bound[x.shape].calls) and profile["steps"] == len(int_plan.ops)
    np.testing.assert_array_equal(before, kept)


@pytest.mark.parametrize("kind", ["float", "int"])
@pytest.mark.parametrize("architecture", ["mlp", "lenet5"])
def test_consecutive_linear_layers_run_as_one_call_with_the_same_bits(architecture, kind):
    """A plan runs consecutive linear layers in one compiled call (where the layers' kernel has a chain: always for
    float, on the AVX2 and AVX-512 int8 kernels); its output has the bits of the steps' own calls run one by one."""
    model, shape = build(architecture, 6)
    model.eval()
    qmodel = converted(model, shape, "int8", 6) if kind == "int" else None
    plan = runtime.compile(model if qmodel is None else qmodel)
    x = np.random.default_rng(6).normal(size=(5,) + shape).astype(np.float32)
    if qmodel is not None:  # codes in, codes out
        x = qmodel.quantize_input(x)
    expected = plan(x) if qmodel is None else plan.forward_int(x)
    bound = plan._bound[x.shape]
    own = [function for calls in bound.per_step for function, _ in calls]
    if kind == "float" or any(function in CHAINS for function in own):
        assert [function for function, _ in bound.calls].count(CHAINS[own[-1]]) == 1
        assert len(bound.calls) == len(own) - 2  # three layers, one call
    np.copyto(bound.input, x)
    for calls in bound.per_step:
        for function, arguments in calls:
            function(*arguments)
    np.testing.assert_array_equal(bound.output, expected)


def test_linear_calls_of_other_numba_types_are_not_chained():
    x, bias = np.ones((2, 3), np.float32), np.zeros(4, np.float32)
    hidden, out = np.empty((2, 4), np.float32), np.empty((2, 1), np.float32)
    wide, narrow = np.ones((4, 3), np.float32).T, np.ones((1, 4), np.float32).T  # layouts F and C (one column)
    calls = [(fk.linear_bias_act, (x, wide, bias, True, hidden)), (fk.linear_bias_act, (hidden, narrow, bias[:1],
                                                                                       False, out))]
    assert [function for function, _ in chain_calls(calls, CHAINS)] == [fk.linear_bias_act] * 2
    assert [function for function, _ in chain_calls(calls[:1] * 2, CHAINS)] == [fk.linear_chain]


class Subclass(np.ndarray):
    pass


def test_inputs_off_the_fast_path_give_the_same_bits(int_plan):
    """A call on a plain float32 array of a known shape skips the full check; every other input (float64,
    big-endian float32, strided views, a subclass) takes it and gives the same result."""
    rng = np.random.default_rng(7)
    wide = rng.normal(size=(3, 1, 8, 16)).astype(np.float32)
    x = np.ascontiguousarray(wide[..., ::2])
    expected = int_plan(x)
    for variant in (wide[..., ::2], x.astype(np.float64), x.astype(">f4"), x.view(Subclass), np.asfortranarray(x)):
        np.testing.assert_array_equal(int_plan(variant), expected)
    float_plan = runtime.compile(build("lenet5", 0)[0].eval())
    np.testing.assert_array_equal(float_plan(wide[..., ::2]), float_plan(x))
    np.testing.assert_array_equal(float_plan(x.astype(np.float64)), float_plan(x))


def test_files_of_another_version_or_damaged_are_refused(int_plan, tmp_path):
    runtime.save(int_plan, tmp_path / "plan.bin")  # saved under exactly the name given
    np.testing.assert_array_equal(runtime.load(tmp_path / "plan.bin")(np.ones((1, 1, 8, 8), np.float32)),
                                  int_plan(np.ones((1, 1, 8, 8), np.float32)))
    path = tmp_path / "plan.npz"
    runtime.save(int_plan, path)
    with np.load(path) as archive:
        arrays = dict(archive)
    header = json.loads(bytes(arrays["__plan__"]))
    header["version"] = 999
    arrays["__plan__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(PlanFormatError, match="version 999.*reads version 1"):
        runtime.load(tmp_path / "future.npz")
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(PlanFormatError, match="not a readable nanoopt plan"):
        runtime.load(tmp_path / "cut.npz")
    np.savez(tmp_path / "other.npz", weight=np.zeros(3))
    with pytest.raises(PlanFormatError, match="not a nanoopt plan file"):
        runtime.load(tmp_path / "other.npz")
    del arrays["s0.m0"]
    header["version"] = 1
    arrays["__plan__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(PlanFormatError, match="lacks its array 'm0'"):
        runtime.load(tmp_path / "missing.npz")


def test_invalid_constants_are_refused_when_the_plan_is_built(int_plan):
    description = roundtrip(int_plan).description
    linear = next(step for step in description.steps if step.op == "linear_q")
    linear.arrays["m0"] = linear.arrays["m0"].copy()
    linear.arrays["m0"][0] = 5  # not in [2^30, 2^31)
    with pytest.raises(PlanFormatError, match="m0"):
        runtime.compile(description)
    description = roundtrip(int_plan).description
    description.steps[0].attrs["x_zero_point"] = 1000
    with pytest.raises(PlanFormatError, match="zero"):
        runtime.compile(description)


def test_training_mode_and_unsupported_layers_are_refused():
    model = models.mlp(4, (3,), 2)
    with pytest.raises(ValueError, match="eval mode"):
        to_plan(model)
    model = nn.Sequential(nn.Linear(4, 3), nn.GELU()).eval()
    with pytest.raises(ValueError, match="GELU.*no runtime operation"):
        to_plan(model)


def test_importing_the_runtime_loads_no_autograd_layers_or_techniques():
    code = ("import sys, nanoopt.runtime; "
            "print(sorted(m for m in sys.modules if m.startswith('nanoopt')))")
    loaded = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    forbidden = ("nanoopt.tensor", "nanoopt.ops", "nanoopt.nn", "nanoopt.optim", "nanoopt.train", "nanoopt.prune",
                 "nanoopt.distill", "nanoopt.quant.observers", "nanoopt.quant.qmodules", "nanoopt.deploy")
    assert "nanoopt.runtime" in loaded
    assert not [name for name in loaded if name.startswith(forbidden)], loaded
    assert "nanoopt.spec" in loaded
    assert not [name for name in loaded if name.startswith("nanoopt.quant")], loaded


def test_precompile_command_runs_a_saved_plan(int_plan, tmp_path, capsys):
    from nanoopt import cli

    path = tmp_path / "plan.npz"
    runtime.save(int_plan, path)
    assert cli.main(["precompile", str(path), "--batch-sizes", "1", "3"]) == 0
    assert "ran batch sizes [1, 3]" in capsys.readouterr().out
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert cli.main(["precompile", str(tmp_path / "bad.npz")]) == 1
    assert "not a readable nanoopt plan" in capsys.readouterr().err


FIRST_CALLS = r"""
import json, sys
import numba
import numpy as np
from numba.core import event
import nanoopt.runtime as runtime

compiled = []  # every function Numba compiles (not loads from its cache) in this process, in order


class Recorder(event.Listener):
    def on_start(self, happening):
        function = happening.data["dispatcher"].py_func
        compiled.append(f"{function.__module__}.{function.__qualname__}")

    def on_end(self, happening):
        pass


event.register("numba:compile", Recorder())
plan = runtime.load(sys.argv[1])
for size in json.loads(sys.argv[2]):
    plan(np.zeros((size, *plan.input_shape), np.float32))
by_plan = list(compiled)


@numba.njit
def probe(x):  # not cached: it compiles here, which shows that the recorder sees a compilation
    return x + 1


probe(1)
print(json.dumps({"compiled": by_plan, "probe_seen": len(compiled) > len(by_plan)}))
"""


@pytest.mark.parametrize("features", [None, "avx2", "none"])
def test_a_precompiled_plan_compiles_nothing_in_a_fresh_process(int_plan, tmp_path, features):
    """``nanoopt precompile`` leaves nothing for a fresh process to compile: loading the plan (the kernel
    self-tests included) and its first calls at the precompiled batch sizes only load from Numba's cache, on this
    CPU and with its features masked (NANOOPT_CPU_FEATURES=avx2 for an AVX2-only machine, none for the portable
    kernels). Counted on Numba's compile events, never timed."""
    path = tmp_path / "plan.npz"
    runtime.save(int_plan, path)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("NANOOPT_")}
    environment["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    if features is not None:
        environment["NANOOPT_CPU_FEATURES"] = features
    sizes = [1, 70]  # batch 70 crosses the thresholds of the threaded drivers where NUMBA_NUM_THREADS > 1
    subprocess.run([sys.executable, "-m", "nanoopt.cli", "precompile", str(path), "--batch-sizes",
                    *map(str, sizes)], env=environment, capture_output=True, text=True, check=True, timeout=900)
    result = subprocess.run([sys.executable, "-c", FIRST_CALLS, str(path), json.dumps(sizes)], env=environment,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["probe_seen"]  # the recorder works: this check could fail
    assert report["compiled"] == []


def test_constants_are_validated_once_not_per_call(int_plan, monkeypatch):
    """After the plan (and the converted model) are built, a call runs no scale/zero-point/multiplier check."""
    import nanoopt.kernels.reference as reference
    import nanoopt.quant.boundary as boundary
    import nanoopt.quant.qmodules as qmodules
    import nanoopt.spec as spec

    model, shape = build("mlp", 0)
    qmodel = converted(model, shape, "int8", 0)
    plan = runtime.compile(qmodel)
    x = np.random.default_rng(0).normal(size=(3,) + shape).astype(np.float32)
    expected_plan, expected_model = plan(x), qmodel(x).data

    def refuse(*args, **kwargs):
        raise AssertionError("a constant was validated again during a call")

    for module, name in ((spec, "check_scale"), (spec, "check_zero_point"), (qmodules, "check_scale"),
                         (qmodules, "check_zero_point"), (boundary, "check_scale"), (boundary, "check_zero_point"),
                         (reference, "check_layer_params"), (reference, "check_requant_params"),
                         (reference, "check_bias")):
        monkeypatch.setattr(module, name, refuse)
    np.testing.assert_array_equal(plan(x), expected_plan)
    np.testing.assert_array_equal(qmodel(x).data, expected_model)
    with pytest.raises(AssertionError, match="validated again"):  # the patches do catch a per-call check
        boundary.quantize_per_tensor(x, qmodel.input_scale, qmodel.input_zero_point, qmodel.input_spec)
