"""Every pruning amount or sparsity out of range is refused, naming the call, what was expected and what came."""

import re

import numpy as np
import pytest

from nanoopt import models, nn, prune

FLOAT_OUT_OF_RANGE = [1.5, -0.1, float("nan"), float("inf"), np.float64(2.0)]
WRONG_TYPE = [True, "0.5", None, [0.5]]


def linear():
    return nn.Linear(4, 4)


UNSTRUCTURED = {
    "l1_unstructured": lambda amount: prune.l1_unstructured(linear(), "weight", amount=amount),
    "random_unstructured": lambda amount: prune.random_unstructured(linear(), "weight", amount=amount, seed=0),
    "ln_structured": lambda amount: prune.ln_structured(linear(), "weight", amount=amount, n=1, dim=0),
    "random_structured": lambda amount: prune.random_structured(linear(), "weight", amount=amount, dim=0, seed=0),
    "global_unstructured": lambda amount: prune.global_unstructured([(linear(), "weight")], amount=amount),
    "prune_channels": lambda amount: prune.prune_channels(models.mlp(8, (4,)), np.ones((1, 8), np.float32),
                                                          amount=amount),
}
COUNTS = {"l1_unstructured": 16, "random_unstructured": 16, "ln_structured": 4, "random_structured": 4,
          "global_unstructured": 16, "prune_channels": 4}


# a float out of [0, 1] (ValueError, naming the range and the value) or an amount of the wrong type (TypeError,
# naming what is accepted)
BAD_AMOUNTS = [pytest.param(amount, ValueError, rf"a float amount is a fraction in \[0, 1\], got "
                                                rf"{re.escape(str(float(amount)))}", id=repr(amount))
               for amount in FLOAT_OUT_OF_RANGE] + [
               pytest.param(amount, TypeError, rf"amount must be a float in \[0, 1\] or an int count, got "
                                               rf"{re.escape(repr(amount))}", id=repr(amount))
               for amount in WRONG_TYPE]


@pytest.mark.parametrize("method", sorted(UNSTRUCTURED))
@pytest.mark.parametrize("amount, error, message", BAD_AMOUNTS)
def test_a_bad_amount_names_the_call_what_is_accepted_and_the_value(method, amount, error, message):
    with pytest.raises(error, match=rf"{method}.*{message}"):
        UNSTRUCTURED[method](amount)


@pytest.mark.parametrize("method", sorted(UNSTRUCTURED))
def test_an_int_amount_beyond_the_candidates_names_the_count(method):
    count = COUNTS[method]
    for amount in (count + 1, -1):
        with pytest.raises(ValueError, match=rf"{method}.*amount={amount} entries to prune, but there are only "
                                             rf"{count} candidates \(an int amount must be in \[0, {count}\]\)"):
            UNSTRUCTURED[method](amount)


SPARSITIES = {
    "prune_to_sparsity": lambda s: prune.prune_to_sparsity(prune.prunable_parameters(models.mlp(8, (4,))), s),
    "one_shot": lambda s: prune.one_shot(models.mlp(8, (4,)), s),
    r"iterative": lambda s: prune.iterative(models.mlp(8, (4,)), (np.ones((4, 8), np.float32), np.zeros(4, int)),
                                            [s], epochs_per_step=0, progress=False),
    r"lottery_ticket \(amount_per_round\)": lambda s: prune.lottery_ticket(
        models.mlp(8, (4,)), (np.ones((4, 8), np.float32), np.zeros(4, int)), rounds=1, amount_per_round=s,
        epochs=0, progress=False),
    r"GradualPruning \(initial_sparsity\)": lambda s: prune.GradualPruning([], s, 1.0, 0, 1, 1),
    r"GradualPruning \(final_sparsity\)": lambda s: prune.GradualPruning([], 0.0, s, 0, 1, 1),
}


@pytest.mark.parametrize("call", sorted(SPARSITIES))
@pytest.mark.parametrize("sparsity", [1.5, -0.1, float("nan"), float("inf"), True, "0.5", None], ids=repr)
def test_a_sparsity_outside_0_1_names_the_argument_and_the_value(call, sparsity):
    with pytest.raises(ValueError, match=rf"{call}.*: a sparsity is a fraction in \[0, 1\], got "
                                         rf"{re.escape(repr(sparsity))}"):
        SPARSITIES[call](sparsity)


def test_layer_sensitivity_amounts_are_checked_like_a_prune_call():
    test = (np.ones((2, 64), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"l1_unstructured\(Linear.*a float amount is a fraction in \[0, 1\], got "
                                         r"1.5"):
        prune.layer_sensitivity(models.tiny_mlp(), test, amounts=(1.5,))


@pytest.mark.parametrize("n, m, error, message", [
    (0, 4, ValueError, r"need 1 <= n <= m \(keep n of every m weights\), got n=0, m=4"),
    (5, 4, ValueError, r"need 1 <= n <= m \(keep n of every m weights\), got n=5, m=4"),
    (2.0, 4, TypeError, r"n must be an int, got 2.0"),
    (2, 3, ValueError, r"dimension 1 has 8 entries, not a multiple of m=3"),
])
def test_nm_sparsity_out_of_range(n, m, error, message):
    with pytest.raises(error, match=r"nm_sparsity\(Linear.*" + message):
        prune.nm_sparsity(nn.Linear(8, 4), "weight", n=n, m=m)
