"""End to end on the bundled digits: a trained LeNet-5 keeps its accuracy through int8, 16x8 and W4A8 + AdaRound."""

import numpy as np
import pytest

import nanoopt as no
from nanoopt import data, models, quant


@pytest.mark.slow
def test_ptq_keeps_the_accuracy_of_a_trained_lenet5():
    no.manual_seed(0)
    train, test = data.load_digits("train"), data.load_digits("test")
    model = models.lenet5(input_size=8)
    no.fit(model, train, epochs=15, lr=0.05, progress=False)
    model.eval()
    reference = no.evaluate(model, test)["accuracy"]
    assert reference > 0.85
    calibration = train[0][:256]
    int8 = quant.quantize_static(model, calibration, progress=False)
    int16 = quant.quantize_static(model, calibration, quant.QuantConfig.int16_activations(), progress=False)
    assert no.evaluate(int8, test)["accuracy"] >= reference - 0.01
    assert no.evaluate(int16, test)["accuracy"] >= reference - 0.005
    prepared = quant.calibrate(quant.prepare(model, quant.QuantConfig.weights4(), calibration[:1]), calibration,
                               progress=False)
    quant.adaround(prepared, calibration, iterations=200, progress=False)
    w4 = quant.convert(prepared)
    assert no.evaluate(w4, test)["accuracy"] >= reference - 0.02
    np.testing.assert_array_equal(w4(test[0]).data, prepared(test[0]).data)
