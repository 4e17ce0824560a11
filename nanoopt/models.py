"""Reference architectures used throughout nanoopt's tests, benchmarks and examples.

* :func:`lenet_300_100`: the fully connected LeNet-300-100 (LeCun et al. 1998), the model of Han et al.'s
  2015 pruning results.
* :func:`lenet5`: LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, for 28x28 or 8x8 inputs.
* :func:`small_resnet`: a CIFAR-style ResNet (He et al. 2016, section 4.2) with BatchNorm and shortcut blocks.
* :func:`mlp` / :func:`tiny_mlp`: plain multilayer perceptrons (distillation students, quick tests).

Every model is built from :mod:`nanoopt.nn` layers, mostly as a flat :class:`~nanoopt.nn.Sequential`, so the
``state_dict`` keys are the ones the equivalent PyTorch ``nn.Sequential`` would have.

>>> import numpy as np, nanoopt as no
>>> model = lenet5(input_size=8)
>>> model(no.Tensor(np.zeros((2, 1, 8, 8)))).shape
(2, 10)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nanoopt import nn
from nanoopt.models_gpt import GPT, GPTConfig, gpt  # noqa: F401 (the GPT lives in its own module)
from nanoopt.tensor import Tensor


def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    """Flatten -> 300 -> ReLU -> 100 -> ReLU -> classes (266,610 parameters for 784 inputs)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet5(input_size: int = 28, in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 with ReLU and max pooling.

    28x28: conv 5x5 (pad 2) 6 -> pool -> conv 5x5 16 -> pool -> 400 -> 120 -> 84 -> classes (61,706 params).
    8x8:   conv 3x3 (pad 1) 6 -> pool -> conv 3x3 (pad 1) 16 -> pool -> 64 -> 120 -> 84 -> classes.
    """
    if input_size == 28:
        kernel, first_padding, second_padding, flat = 5, 2, 0, 16 * 5 * 5
    elif input_size == 8:
        kernel, first_padding, second_padding, flat = 3, 1, 1, 16 * 2 * 2
    else:
        raise ValueError(f"lenet5 supports input_size 28 or 8, got {input_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel, padding=first_padding), nn.ReLU(), nn.MaxPool2d(2),   # (N, 6, S/2, S/2)
        nn.Conv2d(6, 16, kernel, padding=second_padding), nn.ReLU(), nn.MaxPool2d(2),          # (N, 16, ., .)
        nn.Flatten(),
        nn.Linear(flat, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def mlp(in_features: int, hidden: Sequence[int] = (64,), num_classes: int = 10) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU] per hidden width -> Linear to classes."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def tiny_mlp(in_features: int = 64, num_classes: int = 10) -> nn.Sequential:
    """A one-hidden-layer MLP with 32 units (e.g. for the 8x8 digits)."""
    return mlp(in_features, (32,), num_classes)


class BasicBlock(nn.Module):
    """The two-convolution residual block of He et al. 2016 (ResNet, Fig. 2), with BatchNorm.

    out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is the identity, or a strided 1x1
    convolution with BatchNorm when the shape changes (option B of the paper).

    >>> import numpy as np
    >>> BasicBlock(4, 8, stride=2)(np.zeros((1, 4, 8, 8), np.float32)).shape
    (1, 8, 4, 4)
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()
        self.add = nn.Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: Any) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))    # (N, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, self.shortcut(x)))


class ResNet(nn.Module):
    """Stem (conv 3x3, BN, ReLU) -> stages of BasicBlocks (the first block of each later stage has stride 2)
    -> global average pool -> linear classifier."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: int = 1) -> None:
        super().__init__()
        if not widths or blocks_per_stage < 1:
            raise ValueError(f"ResNet needs at least one stage and one block per stage, got widths={widths}, "
                             f"blocks_per_stage={blocks_per_stage}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages: list[nn.Module] = []
        previous = widths[0]
        for index, width in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(previous, width, stride))
                previous = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: Any) -> Any:
        x = self.stem(x)           # (N, w0, H, W)
        x = self.stages(x)         # (N, w_last, H / 2^(stages-1), ...)
        return self.fc(self.flatten(self.pool(x)))  # (N, classes)


def small_resnet(in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: int = 1) -> ResNet:
    """A small CIFAR-style ResNet with BatchNorm and projection shortcuts where shapes change."""
    return ResNet(in_channels, num_classes, widths, blocks_per_stage)

