"""Issue 13: nothing silent. A call that gives a useless or wrong result warns or raises, naming what went wrong.

Each test here failed before its fix: QAT observers that never freeze (13.3), degenerate calibration ranges
(13.5), a layer removed whole by global pruning (13.6), misspelt layer names (13.7) and the smaller checks of 13.10.
"""

import warnings

import numpy as np
import pytest

import nanoopt as no
from nanoopt import data, models, quant


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
