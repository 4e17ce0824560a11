"""Quantization-aware training (nanoopt.quant.qat).

* BatchNorm folding simulated in training equals Conv2d/Linear -> BatchNorm in float when fake quantization is
  off: batch statistics in training (outputs, running statistics and gradients), running statistics when frozen
  or in eval mode.
* After QAT, the frozen model in eval mode equals the converted integer model bit for bit (hypothesis), for
  observer-driven, LSQ and PACT quantizers, folded BatchNorms, pruned and distilled models.
* The switches, the freezing schedule, and the learned quantizers' modules.
"""

import copy
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nanoopt as no
from nanoopt import data, distill, nn, prune
from nanoopt.quant.algorithms import fold_batchnorm
from nanoopt.quant.config import QuantConfig, weight_spec
from nanoopt.quant.fake_quant import LSQQuantizer, NotCalibratedError, PACTQuantizer, WeightFakeQuantize
from nanoopt.quant.ptq import calibrate, convert, prepare, quantizers, set_fake_quant, set_observers
from nanoopt.quant.qat import QATConvBn2d, QATLinearBn1d, QATSchedule, freeze_batchnorm, prepare_qat, qat_config
from nanoopt.spec import QuantSpec, qparams
from nanoopt.tensor import Tensor
from nanoopt.train import fit

SETTINGS = settings(max_examples=30, deadline=None)


def conv_bn_model() -> nn.Sequential:
    """8x8 inputs: conv-BN-ReLU, pool, conv-BN-ReLU, flatten, linear-BN-ReLU, linear."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),   # (N, 4, 4, 4)
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),                              # (N, 6, 2, 2)
        nn.Flatten(), nn.Linear(24, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def digits():
    x, y = data.load_digits("train")
    return x[:512], y[:512]


def _randomise_batchnorm(model: nn.Module, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.weight.data[...] = rng.uniform(0.5, 2.0, module.num_features)
            module.bias.data[...] = rng.normal(0, 0.3, module.num_features)
            module.running_mean[...] = rng.normal(0, 0.3, module.num_features)
            module.running_var[...] = rng.uniform(0.5, 2.0, module.num_features)


# ------------------------------------------------------------------------------------------- BN folding
def test_batchnorm_fold_is_float_equivalent_with_fake_quantization_off(digits):
    no.manual_seed(0)
    model = conv_bn_model()
    _randomise_batchnorm(model, 1)
    x = digits[0][:64]
    qat = prepare_qat(model, example_input=x[:1])
    assert sum(isinstance(m, QATConvBn2d) for m in qat.modules()) == 2
    assert sum(isinstance(m, QATLinearBn1d) for m in qat.modules()) == 1
    set_fake_quant(qat, False)

    # training: batch statistics, running statistics updated the same way, same gradients
    reference = copy.deepcopy(model).train()
    out_qat, out_ref = qat.train()(Tensor(x)), reference(Tensor(x))
    np.testing.assert_allclose(out_qat.data, out_ref.data, rtol=1e-5, atol=1e-5)
    weights = np.random.default_rng(2).standard_normal(out_ref.shape).astype(np.float32)
    (out_qat * Tensor(weights)).sum().backward()
    (out_ref * Tensor(weights)).sum().backward()
    for name, bn_name in (("0", "1"), ("4", "5"), ("8", "9")):
        layer, bn = qat.model.get_submodule(name), reference.get_submodule(bn_name)
        np.testing.assert_allclose(layer.bn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.bn.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.weight.grad, reference.get_submodule(name).weight.grad, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(layer.bn.weight.grad, bn.weight.grad, rtol=1e-3, atol=1e-5)

    # eval mode, and BN frozen in training mode: running statistics (and they no longer change)
    np.testing.assert_allclose(qat.eval()(Tensor(x)).data, reference.eval()(Tensor(x)).data, rtol=1e-5, atol=1e-5)
    freeze_batchnorm(qat)
    running = qat.model.get_submodule("0").bn.running_mean.copy()
    np.testing.assert_allclose(qat.train()(Tensor(x)).data, reference(Tensor(x)).data, rtol=1e-5, atol=1e-5)
    assert np.array_equal(running, qat.model.get_submodule("0").bn.running_mean)


def test_fold_off_keeps_batchnorm_as_a_float_layer(digits):
    model = conv_bn_model()
    with pytest.warns(UserWarning, match="no integer kernel"):
        qat = prepare_qat(model, example_input=digits[0][:1], fold_bn=False)
    assert not any(isinstance(m, QATConvBn2d | QATLinearBn1d) for m in qat.modules())


def test_fake_quantization_off_without_batchnorm_is_the_float_model_exactly(digits):
    no.manual_seed(0)
    model = no.models.mlp(64, (32, 16))
    qat = prepare_qat(model, example_input=digits[0][:1])
    set_fake_quant(qat, False)
    x = Tensor(digits[0][:50])
    assert np.array_equal(qat.train()(x).data, model.train()(x).data)


# ------------------------------------------------------------------------------------------- bit-exact convert
def _train(qat, digits, steps_before_freeze, epochs=1, **fit_options):
    x, y = digits
    fit(qat, (x, y), epochs=epochs, lr=0.02, batch_size=64, progress=False,
        callbacks=[QATSchedule(freeze_observers_after=steps_before_freeze, freeze_bn_after=2)], **fit_options)
    return qat.eval()


def _pruned_mlp():
    no.manual_seed(3)
    model = no.models.mlp(64, (32, 16))
    for module in (model[1], model[3]):
        prune.l1_unstructured(module, "weight", amount=0.6)
    return model


CASES = {
    "int8 observers, folded BN": (conv_bn_model, {}, {}),
    "W4A8 observers": (conv_bn_model, {"config": qat_config(weight=weight_spec(4))}, {}),
    "W2 LSQ, LSQ activations": (conv_bn_model, {"config": qat_config(weight=QuantSpec(bits=2, symmetric=True,
                                                                                        per_channel=True)),
                                                "weight_quantizer": "lsq", "activation_quantizer": "lsq"}, {}),
    "PACT activations, per-tensor W8": (conv_bn_model, {"config": qat_config(weight=weight_spec(8, False)),
                                                        "activation_quantizer": "pact"}, {}),
    "int16 activations": (lambda: no.models.mlp(64, (32,)), {"config": qat_config(
        activation=QuantSpec(bits=16, symmetric=True))}, {}),
    "pruned MLP": (_pruned_mlp, {}, {}),
}


@pytest.fixture(scope="module")
def trained(digits):
    models = {}
    for name, (build, options, fit_options) in CASES.items():
        no.manual_seed(0)
        qat = prepare_qat(build(), example_input=digits[0][:1], **options)
        models[name] = (_train(qat, digits, steps_before_freeze=5, **fit_options), None)
    return {name: (qat, convert(qat)) for name, (qat, _) in models.items()}


inputs = hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.just(1), st.just(8), st.just(8)),
                    elements=st.floats(-2.0, 3.0, width=32))


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(CASES)), inputs, st.sampled_from([1.0, 0.1, 10.0]))
def test_qat_eval_simulation_equals_the_converted_integer_model(trained, case, x, gain):
    qat, integer_model = trained[case]
    x = (x * np.float32(gain)).astype(np.float32)  # small inputs, and large ones that saturate
    assert np.array_equal(qat(Tensor(x)).data, integer_model(x).data)


@pytest.mark.slow
def test_converted_qat_model_has_the_structure_ptq_gives(trained, digits):
    qat, integer_model = trained["int8 observers, folded BN"]
    no.manual_seed(0)
    float_model = conv_bn_model().eval()
    ptq = convert(calibrate(prepare(float_model, QuantConfig(), digits[0][:1]), digits[0][:128], progress=False))
    kinds = [type(m).__name__ for m in integer_model.modules()]
    assert kinds == [type(m).__name__ for m in ptq.modules()]
    assert "QuantizedConv2d" in kinds and "QuantizedLinear" in kinds
    assert not any("BatchNorm" in kind for kind in kinds)
    assert fold_batchnorm(float_model) is not None  # PTQ folds the same pairs QAT simulated


def test_untrained_qat_model_calibrated_like_ptq_converts_to_the_ptq_integer_model(digits):
    """Same observers and calibration batches, no training: every stored integer of the two models is equal."""
    no.manual_seed(0)
    model = no.models.lenet5(input_size=8).eval()
    batches = [digits[0][:96], digits[0][96:192]]
    config = QuantConfig.weights4()
    qat = prepare_qat(model, config, example_input=digits[0][:1])
    from_qat = convert(calibrate(qat, batches, progress=False))
    from_ptq = convert(calibrate(prepare(model, config, digits[0][:1]), batches, progress=False))
    qat_state, ptq_state = from_qat.state_dict(), from_ptq.state_dict()
    assert list(qat_state) == list(ptq_state) and len(qat_state) > 10
    for key, value in ptq_state.items():
        assert qat_state[key].dtype == value.dtype and np.array_equal(qat_state[key], value), key


@pytest.mark.slow
def test_converted_qat_model_keeps_the_float_accuracy_on_real_data():
    """Digits: a trained conv-BN model, one QAT epoch, converted: within 3 points of float (359 test images)."""
    x, y = data.load_digits("train")
    test = data.load_digits("test")
    no.manual_seed(0)
    model = conv_bn_model()
    fit(model, (x, y), epochs=4, lr=0.1, progress=False)
    float_accuracy = no.train.evaluate(model, test)["accuracy"]
    qat = _train(prepare_qat(model, example_input=x[:1]), (x, y), steps_before_freeze=8, epochs=1)
    integer_model = convert(qat)
    accuracy = no.train.evaluate(integer_model, test)["accuracy"]
    assert float_accuracy > 0.85 and accuracy > float_accuracy - 0.03
    assert accuracy == no.train.evaluate(qat, test)["accuracy"]


# ------------------------------------------------------------------------------------------- switches, schedule
@pytest.mark.slow
def test_weight_quantizer_follows_the_weights_until_frozen(digits):
    no.manual_seed(0)
    qat = prepare_qat(no.models.mlp(64, (16,)), example_input=digits[0][:1])
    layer = qat.model.get_submodule("1")
    assert isinstance(layer.weight_quantizer, WeightFakeQuantize)
    fit(qat, digits, epochs=1, lr=0.05, batch_size=128, progress=False)
    # while observing, the grid is the one of the weights of the last forward (one step behind the optimiser)
    qat.train()(Tensor(digits[0][:8]))
    expected = qparams(np.abs(layer.weight.data).max(axis=1) * -1, np.abs(layer.weight.data).max(axis=1),
                       layer.weight_quantizer.spec)[0]
    assert np.array_equal(layer.weight_quantizer.qparams().scale, expected)
    set_observers(qat, False)
    frozen = layer.weight_quantizer.qparams().scale.copy()
    fit(qat, digits, epochs=1, lr=0.05, batch_size=128, progress=False)
    assert np.array_equal(layer.weight_quantizer.qparams().scale, frozen)


@pytest.mark.slow
def test_schedule_freezes_observers_and_batchnorm_after_the_given_steps(digits):
    no.manual_seed(0)
    qat = prepare_qat(conv_bn_model(), example_input=digits[0][:1])
    seen = []

    class Probe(no.train.Callback):
        def on_step_end(self, step, model, loss):
            folded = model.model.get_submodule("0")
            seen.append((step, folded.bn_frozen, all(q.frozen for q in quantizers(model))))

    fit(qat, digits, epochs=1, batch_size=64, lr=0.02, progress=False,
        callbacks=[QATSchedule(freeze_observers_after=5, freeze_bn_after=3), Probe()])
    assert seen[1] == (1, False, False) and seen[2] == (2, True, False)
    assert seen[3] == (3, True, False) and seen[4] == (4, True, True) and seen[-1][1:] == (True, True)
    with pytest.raises(ValueError, match="step count >= 0"):
        QATSchedule(freeze_observers_after=-1)


@pytest.mark.slow
def test_learned_quantizers_are_trained_parameters(digits):
    no.manual_seed(0)
    qat = prepare_qat(conv_bn_model(), example_input=digits[0][:1], weight_quantizer="lsq",
                      activation_quantizer="pact")
    steps = [m.scale for m in qat.modules() if isinstance(m, LSQQuantizer)]
    alphas = [m.alpha for m in qat.modules() if isinstance(m, PACTQuantizer)]
    assert len(steps) == 4 and len(alphas) == 3  # 4 weighted layers; 3 outputs through a fused ReLU
    parameter_ids = {id(p) for p in qat.parameters()}
    assert all(id(p) in parameter_ids for p in steps + alphas)
    before = [p.data.copy() for p in steps]
    fit(qat, digits, epochs=1, batch_size=64, lr=0.02, progress=False)
    assert all(not np.array_equal(b, p.data) for b, p in zip(before, steps, strict=True))
    assert all(float(a.data) > 0 for a in alphas)


# ------------------------------------------------------------------------------------------- pruning, distillation
def test_pact_alpha_gradient_in_a_model_is_the_papers_and_sgd_steps_it(digits):
    """Choi et al. 2018, eq. 3: dL/d(alpha) = sum of dL/dy over the entries with x >= alpha (STE elsewhere).

    dL/dy of every PACT output is read from a zero probe added to it by a forward hook; one SGD step (no
    momentum) then moves alpha by exactly -lr * grad.
    """
    no.manual_seed(0)
    qat = prepare_qat(conv_bn_model(), example_input=digits[0][:1], activation_quantizer="pact").train()
    x, y = digits
    qat(Tensor(x[64:128]))                                   # the first batch initialises alpha (its maximum)
    pacts = [m for m in qat.modules() if isinstance(m, PACTQuantizer)]
    seen = {}

    def probe(module, inputs, output):
        zero = Tensor(np.zeros(output.shape, np.float32), requires_grad=True)
        seen[id(module)] = (np.asarray(inputs[0].data).copy(), zero)
        return output + zero

    handles = [m.register_forward_hook(probe) for m in pacts]
    qat.zero_grad()
    no.nn.functional.cross_entropy(qat(Tensor(x[:64])), y[:64]).backward()
    for handle in handles:
        handle.remove()
    clipped_somewhere = False
    for module in pacts:
        inputs, zero = seen[id(module)]
        clipped = inputs >= module.alpha.data
        clipped_somewhere |= bool(clipped.any())
        expected = zero.grad.astype(np.float64)[clipped].sum()
        assert float(module.alpha.grad) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert clipped_somewhere                                 # the formula was exercised, not only 0 == 0
    before = [float(m.alpha.data) for m in pacts]
    no.optim.SGD([m.alpha for m in pacts], lr=0.1, momentum=0.0).step()
    for module, value in zip(pacts, before, strict=True):
        assert float(module.alpha.data) == pytest.approx(value - 0.1 * float(module.alpha.grad), rel=1e-6)


@pytest.mark.slow
def test_pruned_model_keeps_its_zeros_through_qat_and_convert(digits):
    model = _pruned_mlp()
    masks = {name: model.get_submodule(name).weight_mask.copy() for name in ("1", "3")}
    qat = prepare_qat(model, example_input=digits[0][:1])
    qat = _train(qat, digits, steps_before_freeze=4, epochs=2)
    integer_model = convert(qat)
    for name, mask in masks.items():
        layer = qat.model.get_submodule(name)
        assert np.array_equal(layer.weight_mask, mask)
        assert np.all(layer.weight.data[mask == 0] == 0) and np.any(layer.weight_orig.data[mask == 1] != 0)
        codes = integer_model.model.get_submodule(name).integer_layer().weight
        assert np.all(codes[mask == 0] == 0)
    assert np.array_equal(qat(Tensor(digits[0][:32])).data, integer_model(digits[0][:32]).data)
    assert np.array_equal(model.get_submodule("1").weight_mask, masks["1"])  # the original is untouched


@pytest.mark.slow
def test_pruned_bias_stays_zero_through_qat_ptq_and_convert(digits):
    model = _pruned_mlp()
    prune.l1_unstructured(model[1], "bias", amount=0.5)
    mask = model[1].bias_mask.copy()
    qat = _train(prepare_qat(model, example_input=digits[0][:1]), digits, steps_before_freeze=4, epochs=1)
    layer = qat.model.get_submodule("1")
    assert np.array_equal(layer.bias_mask, mask) and np.all(layer.bias.data[mask == 0] == 0)
    assert np.any(layer.bias_orig.data[mask == 0] != 0)  # the reparametrisation is kept, not baked in
    integer_model = convert(qat)
    assert np.all(integer_model.model.get_submodule("1").integer_layer().bias[mask == 0] == 0)
    assert np.array_equal(qat(Tensor(digits[0][:32])).data, integer_model(digits[0][:32]).data)
    ptq = no.quant.quantize_static(model, digits[0][:128], progress=False)
    assert np.all(ptq.model.get_submodule("1").integer_layer().bias[mask == 0] == 0)


@pytest.mark.slow
def test_qat_student_distilled_from_its_float_teacher(digits):
    x, y = digits
    no.manual_seed(0)
    teacher = no.models.mlp(64, (32,))
    fit(teacher, (x, y), epochs=2, lr=0.05, progress=False)
    student = prepare_qat(teacher, example_input=x[:1])
    distiller = distill.Distiller(student, teacher)
    history = distiller.fit((x, y), epochs=1, lr=0.01, progress=False,
                            callbacks=[QATSchedule(freeze_observers_after=3)])
    distiller.remove_hooks()
    assert math.isfinite(history.train_loss[0])
    assert all(q.frozen for q in quantizers(student))
    assert np.array_equal(student.eval()(Tensor(x[:64])).data, convert(student)(x[:64]).data)


# ------------------------------------------------------------------------------------------- learned quantizer modules
def test_lsq_quantizer_initialises_from_the_first_batch():
    activations = LSQQuantizer(QuantSpec(bits=8), per_example=True, owner="layer '1' output")
    assert not activations.is_calibrated and not activations.frozen
    x = Tensor(np.abs(np.random.default_rng(0).standard_normal((4, 10))).astype(np.float32))
    y = activations(x)
    params = activations.qparams()
    assert int(params.zero_point) == -128  # non-negative data: zero at qmin, the unsigned grid of LSQ
    assert float(params.scale) == pytest.approx(2 * np.abs(x.data).mean() / math.sqrt(255), rel=1e-6)
    assert np.array_equal(y.data, params.dequantize(params.quantize(x.data)))
    assert activations.grad_scale((4, 10)) == pytest.approx(1 / math.sqrt(10 * 255))
    assert activations.frozen

    weights = LSQQuantizer(QuantSpec(bits=4, symmetric=True, per_channel=True), channels=3)
    w = Tensor(np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32), requires_grad=True)
    weights(w).sum().backward()
    assert weights.scale.grad.shape == (3,) and weights.zero_point.tolist() == [0, 0, 0]
    assert weights.grad_scale((3, 5)) == pytest.approx(1 / math.sqrt(5 * 7))
    weights.fake_quant_enabled = False
    assert weights(w) is w


def test_learned_quantizers_refuse_bad_state():
    with pytest.raises(ValueError, match="number of channels"):
        LSQQuantizer(QuantSpec(per_channel=True))
    with pytest.raises(NotCalibratedError, match="seen no data"):
        LSQQuantizer(QuantSpec()).qparams()
    quantizer = LSQQuantizer(QuantSpec(bits=4, symmetric=True, per_channel=True), channels=3)
    with pytest.raises(ValueError, match="expected 3 channels"):
        quantizer(Tensor(np.ones((2, 5), np.float32)))
    quantizer = LSQQuantizer(QuantSpec(bits=4, symmetric=True))
    quantizer(Tensor(np.ones(3, np.float32)))
    quantizer.scale.data[...] = -0.1  # e.g. a step that a too large learning rate pushed below zero
    with pytest.raises(ValueError, match="LSQ step size"):
        quantizer(Tensor(np.ones(3, np.float32)))
    with pytest.raises(ValueError, match="asymmetric"):
        PACTQuantizer(QuantSpec(bits=8, symmetric=True))
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        PACTQuantizer(QuantSpec(), alpha=0.0)
    with pytest.raises(ValueError, match="maximum is -1.0"):
        PACTQuantizer(QuantSpec())(Tensor(np.array([-1.0, -2.0], np.float32)))
    with pytest.raises(TypeError, match="alpha instead"):
        PACTQuantizer(QuantSpec(), alpha=1.0).set_qparams(0.1, -128)


def test_prepare_qat_refuses_bad_input(digits):
    model = no.models.mlp(64, (8,))
    with pytest.raises(ValueError, match="weight_quantizer must be one of"):
        prepare_qat(model, weight_quantizer="adaround")
    with pytest.raises(ValueError, match="activation_quantizer must be one of"):
        prepare_qat(model, activation_quantizer="lsq+")
    with pytest.raises(TypeError, match="QuantConfig"):
        prepare_qat(model, config={"bits": 4})
    with pytest.raises(TypeError, match="nn.Module"):
        prepare_qat(lambda x: x)
    qat = prepare_qat(conv_bn_model(), example_input=digits[0][:1])
    qat.model.get_submodule("4").bn.weight.data[2] = 0.0
    with pytest.raises(ValueError, match=r"layer '4': BatchNorm weight \(gamma\) is 0 for channels \[2\]"):
        qat.train()(Tensor(digits[0][:8]))
    freeze_batchnorm(qat)
    assert np.isfinite(qat(Tensor(digits[0][:8])).data).all()
