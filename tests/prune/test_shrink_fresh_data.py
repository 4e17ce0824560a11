"""``prune.shrink`` on inputs it has not seen: the shrunk model computes what the masked model computed.

``shrink`` traces the model on ``example_input``; nothing it removes or folds may depend on that input. Each case
shrinks with one small batch of [0, 1) inputs and compares on a fresh batch of another size and distribution
(signed, scaled by up to 20x), against a deep copy of the masked model.
"""

import copy

import numpy as np
from batchnorm_testing import randomise_batchnorm
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoopt as no
from nanoopt import models, nn, prune
from nanoopt.train import predict


def randomise(model, rng, positive_bias):
    """BatchNorm statistics and affine parameters off their defaults; biases > 0 where asked, so that pruned
    neurons/filters output the nonzero constant relu(b) that shrink must fold into the next layer."""
    randomise_batchnorm(model, rng)
    for module in model.modules():
        if positive_bias and isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            module.bias.data[...] = rng.uniform(0.1, 1.0, module.bias.shape)


def build(kind, rng, draw):
    """A model, masked with drawn amounts, and the shape of one input."""
    positive_bias = draw(st.booleans())
    if kind == "mlp":
        model = models.mlp(12, hidden=(10, 8))
        randomise(model, rng, positive_bias)
        for index in (1, 3):
            prune.ln_structured(model[index], "weight", amount=draw(st.floats(0.0, 0.9)),
                                n=draw(st.sampled_from([1, 2])), dim=0)
        shape = (12,)
    elif kind == "lenet5":                                 # conv (pad 1) -> pool -> conv (pad 1) -> pool -> fc
        model = models.lenet5(input_size=8)
        randomise(model, rng, positive_bias)
        for index, amount in ((0, draw(st.floats(0.0, 0.8))), (3, draw(st.floats(0.0, 0.9))),
                              (7, draw(st.floats(0.0, 0.9)))):
            prune.ln_structured(model[index], "weight", amount=amount, n=2, dim=0)
        shape = (1, 8, 8)
    else:                                                  # residual stream, BatchNorm, projection shortcuts
        model = models.small_resnet(widths=(4, 8), blocks_per_stage=draw(st.integers(1, 2)))
        randomise(model, rng, positive_bias=False)
        example = rng.random((2, 1, 8, 8)).astype(np.float32)
        prune.prune_channels(model, example, amount=draw(st.floats(0.0, 0.9)),
                             criterion=draw(st.sampled_from(["l1", "l2", "bn_scale"])))
        shape = (1, 8, 8)
    if draw(st.booleans()):                                # unstructured zeros on top: kept inside the survivors
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                prune.l1_unstructured(module, "weight", amount=draw(st.floats(0.0, 0.5)))
    return model.eval(), shape


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["mlp", "lenet5", "resnet"]), st.integers(0, 2**31 - 1), st.integers(1, 3),
       st.integers(1, 9), st.floats(0.05, 20.0), st.data())
def test_shrunk_model_equals_the_masked_model_on_fresh_inputs(kind, seed, seen, unseen, scale, data):
    no.manual_seed(seed % 1000)
    rng = np.random.default_rng(seed)
    model, shape = build(kind, rng, data.draw)
    example = rng.random((seen, *shape)).astype(np.float32)
    fresh = (rng.standard_normal((unseen, *shape)) * scale).astype(np.float32)
    masked = copy.deepcopy(model)
    expected, expected_seen = predict(masked, fresh), predict(masked, example)
    before = model.num_parameters()
    prune.shrink(model, example)
    assert model.num_parameters() <= before
    for inputs, reference in ((fresh, expected), (example, expected_seen)):
        got = predict(model, inputs)
        assert got.shape == reference.shape
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4 * (1 + np.abs(reference).max()))
