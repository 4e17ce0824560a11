"""What the tests of ``prune.shrink`` share: BatchNorm layers moved off their defaults, so that folding them (and
the constants that removed channels leave behind) is exercised with real numbers."""

from nanoopt import nn


def randomise_batchnorm(model: nn.Module, rng) -> None:
    """Draw the running statistics and the affine parameters of every BatchNorm1d/2d of ``model`` from ``rng``."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = module.num_features
            module.running_mean[...] = rng.normal(0, 0.5, c)
            module.running_var[...] = rng.uniform(0.5, 2.0, c)
            module.weight.data[...] = rng.normal(1, 0.3, c)
            module.bias.data[...] = rng.normal(0, 0.3, c)
