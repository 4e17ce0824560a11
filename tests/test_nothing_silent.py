"""Issue 13: nothing silent. A call that gives a useless or wrong result warns or raises, naming what went wrong.

Each test here failed before its fix: QAT observers that never freeze (13.3), degenerate calibration ranges
(13.5), a layer removed whole by global pruning (13.6), misspelt layer names (13.7) and the smaller checks of 13.10.
"""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import data, distill, models, nn, prune, quant
from nanoopt.kernels.choices import kernel_choices
from nanoopt.quant.range_check import DOMINANCE


@pytest.fixture(scope="module")
def digits():
    return data.load_digits("train"), data.load_digits("test")


@pytest.fixture(scope="module")
def trained(digits):
    no.manual_seed(0)
    model = models.tiny_mlp()
    no.fit(model, digits[0], epochs=2, progress=False)
    return model


def _no_warning(match: str):
    """A context that fails if a warning whose message contains ``match`` is raised."""
    class Guard:
        def __enter__(self):
            self.context = warnings.catch_warnings(record=True)
            self.caught = self.context.__enter__()
            warnings.simplefilter("always")
            return self

        def __exit__(self, *exc):
            self.context.__exit__(*exc)
            messages = [str(w.message) for w in self.caught if match in str(w.message)]
            assert not messages, messages
    return Guard()


# ------------------------------------------------------------------------------------------ 13.3 QAT freezing
@pytest.mark.slow
def test_qat_schedule_that_never_fires_warns_and_convert_names_live_observers(digits, trained):
    train, test = digits
    qat = quant.prepare_qat(trained, example_input=train[0][:1])
    steps = -(-len(train[1]) // 128)  # one epoch of batches of 128
    with pytest.warns(UserWarning, match=rf"freeze_observers_after={steps + 5} was never reached \(training ran "
                                         rf"{steps} optimiser steps\)"):
        no.fit(qat, train, epochs=1, lr=0.01, progress=False,
               callbacks=[quant.QATSchedule(freeze_observers_after=steps + 5)])
    with pytest.warns(UserWarning, match=r"quant.convert: \d+ quantizers are still observing \(layer '1' weight"):
        integer_model = quant.convert(qat)
    before = qat.eval()(test[0]).data
    assert not np.array_equal(before, integer_model(test[0]).data)  # what the warnings are about


@pytest.mark.slow
def test_qat_frozen_by_the_schedule_converts_bit_for_bit_without_warnings(digits, trained):
    train, test = digits
    qat = quant.prepare_qat(trained, example_input=train[0][:1])
    with _no_warning("QATSchedule"), _no_warning("quant.convert"):
        no.fit(qat, train, epochs=1, lr=0.01, progress=False, callbacks=[quant.QATSchedule(freeze_observers_after=8)])
        integer_model = quant.convert(qat)
    for _ in range(2):  # evaluating the QAT model changes nothing once frozen
        assert np.array_equal(qat.eval()(test[0]).data, integer_model(test[0]).data)


def test_convert_warns_when_fake_quantization_is_off(digits, trained):
    prepared = quant.calibrate(quant.prepare(trained, example_input=digits[0][0][:1]), digits[0][0][:64],
                               progress=False)
    quant.set_fake_quant(prepared, False, "activation")
    with pytest.warns(UserWarning, match="fake quantization off"):
        quant.convert(prepared)


# ------------------------------------------------------------------------------------------ 13.5 degenerate ranges
def _calibration_warnings(model, batches, example) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quant.calibrate(quant.prepare(model, example_input=example), batches, progress=False)
    return [str(w.message) for w in caught if "degenerate calibration ranges" in str(w.message)]


@pytest.mark.slow
def test_all_zero_calibration_warns_naming_the_input_and_each_constant_layer(digits, trained):
    images = np.zeros_like(digits[0][0][:64])
    with pytest.warns(UserWarning, match=r"the model input: zero range, every calibration value was 0 \(range "
                                         r"\[0, 0\]\)\n  layer '1' output: the same output for every calibration "
                                         r"example \(64 examples, range"):
        integer_model = quant.quantize_static(trained, images, progress=False)
    assert no.evaluate(integer_model, digits[1])["accuracy"] < 0.25  # what the warning is about: chance level


def test_a_relu_that_sees_only_negative_values_is_named_with_its_zero_range():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    model[0].weight.data[...] = np.eye(4, dtype=np.float32)
    model[0].bias.data[...] = 0.0
    negative = -np.random.default_rng(0).uniform(0.5, 2.0, size=(32, 4)).astype(np.float32)
    (message,) = _calibration_warnings(model, negative, negative[:1])
    assert "layer '0' output: zero range, every calibration value was 0 (range [0, 0])" in message


def test_one_huge_value_among_normal_data_is_named_with_the_range(digits, trained):
    images = digits[0][0][:64].copy()
    images[3, 0, 4, 4] = 1e30
    with pytest.warns(UserWarning, match=r"the model input: one value dominates the range \[0, 1e\+30\]: half of "
                                         r"the nonzero values have \|x\| <= 0\.\d+, \d\.\de\+30 times smaller"):
        quant.quantize_static(trained, images, progress=False)


def test_an_output_on_one_code_is_named():
    model = nn.Sequential(nn.Linear(4, 2))
    tiny = np.random.default_rng(0).uniform(1e-9, 2e-9, size=(16, 4)).astype(np.float32)  # below the eps step
    messages = _calibration_warnings(model, tiny, tiny[:1])
    assert len(messages) == 1 and "the model input: the output collapses to one code (-128)" in messages[0]


def test_normal_calibration_gives_no_degenerate_range_warning(digits, trained):
    assert _calibration_warnings(trained, digits[0][0][:256], digits[0][0][:1]) == []
    no.manual_seed(0)
    lenet = models.lenet5(input_size=8)
    assert _calibration_warnings(lenet, digits[0][0][:64], digits[0][0][:1]) == []


@settings(max_examples=40, deadline=None)
@given(size=st.integers(8, 3000), log_scale=st.floats(-3, 3), outlier=st.booleans(), seed=st.integers(0, 2**16))
def test_range_warning_iff_one_value_dominates(size, log_scale, outlier, seed):
    """Normal data at any scale never warn (max / median of |x| of a normal sample is far below DOMINANCE); one
    value DOMINANCE times the largest of the others always does."""
    data_ = (np.random.default_rng(seed).normal(size=(size, 1)) * 10.0**log_scale).astype(np.float32)
    if outlier:
        data_[size // 2, 0] = np.float32(DOMINANCE * np.abs(data_).max() * 1.01)
    messages = [m for m in _calibration_warnings(nn.Sequential(nn.Linear(1, 1)), data_, data_[:1])
                if "the model input" in m]
    assert bool(messages) == outlier
    if outlier:
        assert "the model input: one value dominates the range" in messages[0]


# ------------------------------------------------------------------------------------------ 13.6 global pruning
@pytest.mark.slow
def test_global_pruning_that_empties_a_layer_warns_naming_it(digits):
    no.manual_seed(0)
    model = models.lenet_300_100(in_features=64)
    no.fit(model, digits[0], epochs=1, progress=False)
    with pytest.warns(UserWarning, match=r"every entry of 'weight' in parameters\[1\], Linear\(in_features=300, "
                                         r"out_features=100, bias=True\) is now pruned \(30,000 of 30,000\)"):
        prune.global_unstructured(prune.prunable_parameters(model), amount=0.9)
    assert not model[3].weight_mask.any()  # what the warning is about: layer '3' is gone
    assert no.evaluate(model, digits[1])["accuracy"] < 0.2
    no.manual_seed(0)
    model = models.lenet_300_100(in_features=64)
    no.fit(model, digits[0], epochs=1, progress=False)
    with pytest.warns(UserWarning, match=r"every entry of 'weight' in layer '3' is now pruned"):
        prune.global_unstructured(prune.prunable_parameters(model), amount=0.9, model=model)


@pytest.mark.slow
def test_global_pruning_with_a_floor_keeps_every_layer_alive(digits):
    no.manual_seed(0)
    model = models.lenet_300_100(in_features=64)
    no.fit(model, digits[0], epochs=1, progress=False)
    parameters = prune.prunable_parameters(model)
    with _no_warning("global_unstructured"):
        prune.global_unstructured(parameters, amount=0.9, min_remaining=0.02)
    sizes = [module.weight.size for module, _ in parameters]
    assert [int(module.weight_mask.sum()) >= np.ceil(0.02 * size) for (module, _), size in
            zip(parameters, sizes, strict=True)] == [True] * 3
    assert sum(int((module.weight_mask == 0).sum()) for module, _ in parameters) == round(0.9 * sum(sizes))
    with pytest.raises(ValueError, match=r"min_remaining=0.5 keeps"):
        prune.global_unstructured(parameters, amount=1.0, min_remaining=0.5)
    with pytest.raises(ValueError, match=r"min_remaining is a fraction in \[0, 1\], got 1.5"):
        prune.global_unstructured(parameters, amount=0.1, min_remaining=1.5)


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
       scales=st.lists(st.floats(1e-4, 1e4), min_size=4, max_size=4), amount=st.floats(0, 1),
       floor=st.one_of(st.floats(0, 0.5), st.integers(0, 4)), seed=st.integers(0, 2**16))
def test_floor_property(shapes, scales, amount, floor, seed):
    """With a floor, every parameter keeps min(size, floor) entries and exactly round(amount * N) are pruned,
    or the call refuses (when the floors leave too few candidates) and changes nothing."""
    rng = np.random.default_rng(seed)
    layers = [nn.Linear(i, o) for i, o in shapes]
    for layer, scale in zip(layers, scales, strict=False):
        layer.weight.data[...] = (rng.normal(size=layer.weight.shape) * scale).astype(np.float32)
    parameters = [(layer, "weight") for layer in layers]
    total = sum(layer.weight.size for layer in layers)
    floors = [min(layer.weight.size, floor if isinstance(floor, int) else int(np.ceil(floor * layer.weight.size
                                                                                       - 1e-9)))
              for layer in layers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if round(amount * total) > total - sum(floors):
            with pytest.raises(ValueError, match="min_remaining"):
                prune.global_unstructured(parameters, amount=amount, min_remaining=floor)
            assert not any(prune.is_pruned(layer) for layer in layers)
            return
        prune.global_unstructured(parameters, amount=amount, min_remaining=floor)
    kept = [int(layer.weight_mask.sum()) for layer in layers]
    assert all(k >= f for k, f in zip(kept, floors, strict=True))
    assert total - sum(kept) == round(amount * total)


# ------------------------------------------------------------------------------------------ 13.7 layer names
@pytest.mark.parametrize("config, argument, name", [
    (quant.QuantConfig(overrides={"fc1": {"weight": quant.weight_spec(4)}}), "QuantConfig.overrides", "fc1"),
    (quant.QuantConfig(keep_float=["3", "head"]), "QuantConfig.keep_float", "head"),
    (quant.QuantConfig(keep_float=["input"]), "QuantConfig.keep_float", "input"),
])
def test_misspelt_layer_names_in_a_quant_config_are_errors_listing_the_layers(digits, trained, config, argument,
                                                                              name):
    images = digits[0][0][:32]
    message = rf"{argument}: no such layers in the model: '{name}'.*The model's layers are: '0', '1', '2', '3'"
    for call in (lambda: quant.quantize_static(trained, images, config, progress=False),
                 lambda: quant.prepare_qat(trained, config, example_input=images[:1])):
        with pytest.raises(ValueError, match=message):
            call()


def test_layer_names_that_exist_are_accepted(digits, trained):
    config = quant.QuantConfig(overrides={"input": {"activation": quant.QuantSpec(bits=7)},
                                          "3": {"weight": quant.weight_spec(4)}}, keep_float=["3"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning either
        quant.quantize_static(trained, digits[0][0][:32], config, progress=False)


def test_misspelt_names_in_pruning_apis_are_errors_listing_the_layers(digits):
    model = models.small_resnet(widths=(4,), blocks_per_stage=2)
    example = np.ones((1, 1, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"candidates: no such modules in the model: 'stages.0.2' "
                                         r"\(did you mean 'stages.0.1'\?\).*'stages.0.0'"):
        prune.block_angular_distances(model, example, ["stages.0.2"])
    with pytest.raises(ValueError, match=r"no such modules in the model: 'stage.0.1' \(did you mean "
                                         r"'stages.0.1'"):
        prune.remove_blocks(model, ["stage.0.1"], example)
    with pytest.raises(ValueError, match=r"layer_sensitivity: '2' is not a layer with a weight in this "
                                         r"model; its layers with a weight are \['1', '3'\]$"):
        prune.analysis.layer_sensitivity(models.tiny_mlp(), digits[1], amounts=(0.5,), layers=["2"])


# ------------------------------------------------------------------------------------------ 13.10 the smaller ones
def test_fit_refuses_what_it_cannot_train_on(digits):
    (x, y), model = digits[0], models.tiny_mlp()
    with pytest.raises(ValueError, match=r"fit: the data hold no samples"):
        no.fit(model, (x[:0], y[:0]), progress=False)
    with pytest.raises(ValueError, match=r"fit: the training data gave no batches in epoch 0"):
        no.fit(model, [], progress=False)
    for lr in (float("nan"), -0.1, float("inf")):
        with pytest.raises(ValueError, match=r"SGD: learning rate must be a finite number >= 0, got"):
            no.fit(model, (x, y), lr=lr, progress=False)
    with pytest.raises(ValueError, match=r"labels must be class indices of shape \(1438,\), got shape \(1438, 10\); "
                                         r"one-hot labels\? pass labels.argmax\(axis=1\)"):
        no.fit(model, (x, np.eye(10)[y]), progress=False)
    with pytest.raises(ValueError, match=r"training batch 0 of epoch 0: labels must be class indices"):
        no.fit(model, [(x[:8], np.eye(10)[y[:8]])], progress=False)
    with pytest.raises(TypeError, match=r"fit: the images of an \(images, labels\) pair must be an ndarray, got list"):
        no.fit(model, (list(x), y), progress=False)
    with pytest.raises(ValueError, match=r"evaluate: labels must be class indices"):
        no.evaluate(model, (x, np.eye(10)[y]))


def test_distillation_settings_that_cannot_work_are_refused(digits):
    with pytest.raises(ValueError, match=r"DistillConfig: temperature 1e\+09 is above 100, where T\^2 KL on float32 "
                                         r"logits loses its precision"):
        distill.DistillConfig(temperature=1e9)
    rng = np.random.default_rng(0)
    student, teacher = (rng.normal(scale=0.1, size=(8, 10)).astype(np.float32) for _ in range(2))
    with pytest.raises(ValueError, match=r"kd_loss: temperature 1000 is above 100"):
        distill.kd_loss(student, teacher, temperature=1000.0)  # it gave a negative loss before
    with pytest.raises(ValueError, match=r"dkd_loss: temperature 1e\+06 is above 100000, where T\^2 KL on float64"):
        distill.dkd_loss(student.astype(np.float64), teacher.astype(np.float64), np.zeros(8, np.int64), temperature=1e6)
    with pytest.raises(ValueError, match=r"hard_weight and soft_weight are both 0"):
        distill.DistillConfig(hard_weight=0, soft_weight=0.0)
    with pytest.raises(TypeError, match=r"Distiller: teachers must be a nanoopt.nn.Module or a list of them, got "
                                        r"function"):
        distill.Distiller(models.tiny_mlp(), lambda x: x, distill.DistillConfig())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.floats(0.01, 10.0), temperature=st.floats(1.0, 100.0))
def test_kd_loss_keeps_its_precision_up_to_the_temperature_limit(seed, spread, temperature):
    """Within the accepted range, float32 T^2 KL agrees with a float64 computation to within its rounding bound
    T^2 * eps32 * 8 log C (what the limit is set from: at most 0.02 at T = 100, C = 10; at T = 1e9 the loss was 0
    or negative where the exact value is 21.6)."""
    rng = np.random.default_rng(seed)
    student, teacher = (rng.normal(scale=spread, size=(16, 10)).astype(np.float32) for _ in range(2))
    value = distill.kd_loss(student, teacher, temperature=temperature).item()
    exact = distill.kd_loss(student.astype(np.float64), teacher.astype(np.float64), temperature=temperature).item()
    assert abs(value - exact) <= temperature**2 * np.finfo(np.float32).eps * 8 * np.log(10) + 1e-6 * exact


def test_quantize_static_names_the_layer_whose_weights_are_nan(digits, trained):
    import copy
    broken = copy.deepcopy(trained)
    broken[3].weight.data[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"parameter '3\.weight' of layer '3' \(Linear\) \(shape \(10, 32\), float32\) "
                                         r"contains 1 NaN \(first at index \(1, 2\)\)"):
        quant.quantize_static(broken, digits[0][0][:32], progress=False)


def test_float_transforms_refuse_converted_models(digits, trained):
    images = digits[0][0][:32]
    converted = {"quant.convert": quant.quantize_static(trained, images, progress=False),
                 "quant.quantize_dynamic / quantize_weights": quant.quantize_dynamic(trained),
                 "prune.to_sparse": _sparse(trained)}
    calls = {"prepare_qat": lambda m: quant.prepare_qat(m, example_input=images[:1]),
             "cross_layer_equalization": lambda m: quant.cross_layer_equalization(m, images[:1]),
             "prune.shrink": lambda m: prune.shrink(m, images[:1]),
             "prune.to_sparse": lambda m: prune.to_sparse(m),
             "quantize_weights": lambda m: quant.quantize_weights(m, bits=4),
             "quantize_dynamic": lambda m: quant.quantize_dynamic(m),
             "quant.prepare": lambda m: quant.quantize_static(m, images, progress=False)}
    for made_by, model in converted.items():
        for function, call in calls.items():
            if function == "prune.to_sparse" and made_by == "prune.to_sparse":
                assert prune.to_sparse(model) == []  # sparse layers are left as they are
                continue
            message = rf"{function}: the model is already converted \(layer '[\w.]+' is a \w+ made by {made_by}"
            if function == "quant.prepare" and made_by == "quant.convert":
                message = "prepare expects a float model, got a QuantizedModel"  # the check of the root, as before
            with pytest.raises(TypeError, match=message):
                call(model)


def _sparse(model):
    import copy
    model = copy.deepcopy(model)
    prune.l1_unstructured(model[1], "weight", amount=0.8)
    assert prune.to_sparse(model) == ["1"]
    return model


def test_tune_backends_refuses_what_it_cannot_time(digits, trained):
    images = digits[0][0][:16]
    with pytest.raises(TypeError, match=r"tune_backends: model must be an integer model .* got Sequential"):
        quant.tune_backends(trained, images)
    integer_model = quant.quantize_static(trained, images, progress=False)
    with pytest.raises(ValueError, match=r"tune_backends: repeats must be an int >= 1 .* got 0"):
        quant.tune_backends(integer_model, images, repeats=0)


def test_cli_seed_version_and_info(capsys):
    from nanoopt import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "argument --seed: must be a non-negative integer, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"nanoopt {no.__version__}"
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    for choice in kernel_choices():
        assert f"  {choice.operation}" in printed
        line = next(line for line in printed.splitlines() if line.strip().startswith(choice.operation))
        assert line.split()[len(choice.operation.split())] == choice.backend
    assert "kernel backend: auto" in printed


def test_kernel_choices_follow_the_backend_setting():
    from nanoopt import kernels

    with kernels.use_backend("reference"):
        dense = [c for c in kernel_choices() if not c.operation.startswith("sparse")]
    assert {c.backend for c in dense} == {"reference"}
    with kernels.use_backend("numba"):
        assert kernel_choices()[0].backend == "numba"
    auto = kernel_choices()[0]
    assert auto.backend == ("avx2" if kernels.avx2_available() else "numba")
