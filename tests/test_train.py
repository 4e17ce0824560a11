"""fit/evaluate: determinism under manual_seed, the digits accuracy bar, callbacks."""

import numpy as np
import pytest

import nanoopt as no
from nanoopt import data, models, train


def _train_lenet_300_100(seed):
    no.manual_seed(seed)
    model = models.lenet_300_100(in_features=64)
    history = no.fit(model, data.load_digits("train"), epochs=15, lr=0.05, batch_size=32, progress=False)
    return model, history


@pytest.mark.slow
def test_lenet_300_100_reaches_95_percent_on_the_bundled_digits():
    model, history = _train_lenet_300_100(0)
    accuracy = no.evaluate(model, data.load_digits("test"))["accuracy"]
    assert accuracy >= 0.95, accuracy
    assert history.train_loss[-1] < history.train_loss[0]


@pytest.mark.slow
def test_training_is_deterministic_under_manual_seed():
    first, _ = _train_lenet_300_100(3)
    second, _ = _train_lenet_300_100(3)
    for key, value in first.state_dict().items():
        np.testing.assert_array_equal(value, second.state_dict()[key])
    third, _ = _train_lenet_300_100(4)
    assert not np.array_equal(first.state_dict()["1.weight"], third.state_dict()["1.weight"])


@pytest.mark.slow
def test_callbacks_see_every_step_and_epoch_and_evaluate_restores_mode():
    events = []

    class Recorder(train.Callback):
        def on_step_end(self, step, model, loss):
            events.append(("step", step))

        def on_epoch_end(self, epoch, model, logs):
            events.append(("epoch", epoch, "val_accuracy" in logs))

    no.manual_seed(0)
    images, labels = data.load_digits("train")
    loader = data.DataLoader(images[:100], labels[:100], batch_size=25)
    model = models.tiny_mlp()
    history = no.fit(model, loader, epochs=2, callbacks=[Recorder()], val_data=data.load_digits("test"),
                     progress=False)
    assert [e for e in events if e[0] == "step"] == [("step", i) for i in range(8)]
    assert ("epoch", 1, True) in events and len(history.val_accuracy) == 2
    model.train()
    no.evaluate(model, (images[:10], labels[:10]))
    assert model.training


@pytest.mark.slow
def test_a_diverging_loss_stops_with_a_clear_error():
    no.manual_seed(0)
    model = models.mlp(64, hidden=())  # linear: nothing saturates, a huge step overflows
    with pytest.raises(FloatingPointError, match="learning rate"), np.errstate(all="ignore"):
        no.fit(model, data.load_digits("train"), epochs=3, lr=1e38, progress=False)


def test_non_finite_inputs_are_refused():
    images, labels = data.load_digits("train")
    images = images[:64].copy()
    images[5, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        no.fit(models.tiny_mlp(), (images, labels[:64]), epochs=1, progress=False)


def test_evaluate_on_no_data_raises():
    with pytest.raises(ValueError, match="no samples"):
        no.evaluate(models.tiny_mlp(), [])
