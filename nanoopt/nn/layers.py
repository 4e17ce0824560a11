"""Layers with PyTorch's names, arguments, parameter names and default initialisation.

Each layer checks the shape of what it receives and says, naming itself, what it expected and what it got.
Containers (:class:`Sequential`) add the child's name to such errors, so a wrong shape deep inside a model is
reported as ``layer '3' (Linear(...)): expected ...``.

>>> import numpy as np, nanoopt as no
>>> from nanoopt import nn
>>> layer = nn.Conv2d(1, 4, kernel_size=3, padding=1)
>>> layer(no.Tensor(np.zeros((2, 1, 8, 8)))).shape
(2, 4, 8, 8)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from nanoopt.nn import functional as F
from nanoopt.nn import init
from nanoopt.nn.module import Module, Parameter
from nanoopt.ops import _pair
from nanoopt.tensor import Tensor


def _as_input(layer: Module, x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return Tensor(x)
    raise TypeError(f"{layer!r}: expected a Tensor or ndarray input, got {type(x).__name__}")


def _naming(layer: Module, function: Any, *args: Any) -> Tensor:
    """Call a functional form; a ValueError about the input's shape is re-raised naming ``layer``."""
    try:
        return function(*args)
    except ValueError as error:
        raise ValueError(f"{layer!r}: {error}") from None


class Identity(Module):
    """Returns its input unchanged."""

    def forward(self, x: Any) -> Any:
        return x


class Linear(Module):
    """y = x W^T + b; W (out_features, in_features), Kaiming-uniform initialised as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear needs positive sizes, got in_features={in_features}, "
                             f"out_features={out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(np.empty((out_features, in_features), dtype=np.float32))
        self.register_parameter("bias", Parameter(np.empty(out_features, dtype=np.float32)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Any) -> Tensor:
        x = _as_input(self, x)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self!r}: expected input (N, {self.in_features}), got shape {x.shape}")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution, NCHW; weight (out_channels, in_channels / groups, KH, KW), PyTorch's init."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels={in_channels} and out_channels={out_channels} must both be "
                             f"divisible by groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding = _pair(stride, "stride"), _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.weight = Parameter(np.empty((out_channels, in_channels // groups, *self.kernel_size), np.float32))
        self.register_parameter("bias", Parameter(np.empty(out_channels, dtype=np.float32)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init.fan_in_and_fan_out(self.weight.shape)
            init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: Any) -> Tensor:
        x = _as_input(self, x)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self!r}: expected input (N, {self.in_channels}, H, W), got shape {x.shape}")
        return _naming(self, F.conv2d, x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                       self.groups)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + ("" if self.bias is not None else ", bias=False")


class _BatchNorm(Module):
    """Shared body of BatchNorm1d/2d (Ioffe & Szegedy 2015); see :class:`nanoopt.ops.BatchNorm` for the math.

    ``momentum=None`` gives the cumulative moving average (momentum 1 / num_batches_tracked), as PyTorch.
    """

    expected_ndim: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True) -> None:
        super().__init__()
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1] or None, got {momentum}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = Parameter(np.ones(num_features, dtype=np.float32))
            self.bias = Parameter(np.zeros(num_features, dtype=np.float32))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
            self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x: Any) -> Tensor:
        x = _as_input(self, x)
        if x.ndim not in self.expected_ndim or x.shape[1] != self.num_features:
            dims = " or ".join(f"{d}-D" for d in self.expected_ndim)
            raise ValueError(f"{self!r}: expected a {dims} input with {self.num_features} channels in axis 1, "
                             f"got shape {x.shape}")
        use_batch_stats = self.training or not self.track_running_stats
        momentum = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        weight = self.weight if self.affine else np.ones(self.num_features, dtype=x.dtype)
        bias = self.bias if self.affine else np.zeros(self.num_features, dtype=x.dtype)
        update = self.training and self.track_running_stats
        return F.batch_norm(x, self.running_mean if update or not use_batch_stats else None,
                            self.running_var if update or not use_batch_stats else None, weight, bias,
                            training=use_batch_stats, momentum=momentum or 0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) inputs."""

    expected_ndim = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) inputs, per channel."""

    expected_ndim = (4,)


class LayerNorm(Module):
    """Layer normalisation over the trailing ``normalized_shape`` axes (Ba et al. 2016).

    ``bias=False`` keeps the learned scale but no shift (PyTorch's ``bias`` argument; no ``bias`` parameter).
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps, self.elementwise_affine = shape, eps, elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(np.ones(shape, dtype=np.float32))
            self.register_parameter("bias", Parameter(np.zeros(shape, dtype=np.float32)) if bias else None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Any) -> Tensor:
        x = _as_input(self, x)
        weight = self.weight if self.elementwise_affine else np.ones(self.normalized_shape, dtype=x.dtype)
        bias = self.bias if self.bias is not None else np.zeros(self.normalized_shape, dtype=x.dtype)
        return _naming(self, F.layer_norm, x, self.normalized_shape, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class ReLU(Module):
    def forward(self, x: Any) -> Tensor:
        return F.relu(_as_input(self, x))


class GELU(Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Any) -> Tensor:
        return F.gelu(_as_input(self, x), self.approximate)


class Sigmoid(Module):
    def forward(self, x: Any) -> Tensor:
        return F.sigmoid(_as_input(self, x))


class Tanh(Module):
    def forward(self, x: Any) -> Tensor:
        return F.tanh(_as_input(self, x))


class _Pool2d(Module):
    """What a windowed 2-D pool stores (PyTorch's ``_MaxPoolNd`` / ``_AvgPoolNd``): kernel, stride (default: the
    kernel) and padding. Max and average pooling are siblings, so ``isinstance`` tells one from the other."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")
        self.padding = _pair(padding, "padding")

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    def forward(self, x: Any) -> Tensor:
        return _naming(self, F.max_pool2d, _as_input(self, x), self.kernel_size, self.stride, self.padding)


class AvgPool2d(_Pool2d):
    def forward(self, x: Any) -> Tensor:
        return _naming(self, F.avg_pool2d, _as_input(self, x), self.kernel_size, self.stride, self.padding)


class AdaptiveAvgPool2d(Module):
    def __init__(self, output_size: Any) -> None:
        super().__init__()
        self.output_size = _pair(output_size, "output_size")

    def forward(self, x: Any) -> Tensor:
        return _naming(self, F.adaptive_avg_pool2d, _as_input(self, x), self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class Flatten(Module):
    """Merge the dimensions from ``start_dim`` (default 1: keep the batch axis) on."""

    def __init__(self, start_dim: int = 1) -> None:
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x: Any) -> Tensor:
        x = _as_input(self, x)
        if x.ndim <= self.start_dim:
            raise ValueError(f"{self!r}: expected at least {self.start_dim + 1} dimensions, got shape {x.shape}")
        return x.flatten(self.start_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}"


class Dropout(Module):
    """Inverted dropout with probability ``p``; the identity in eval mode."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Any) -> Tensor:
        return F.dropout(_as_input(self, x), self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Add(Module):
    """Elementwise sum of two tensors of the same shape, as a module so that techniques can see it.

    Residual connections use it instead of ``+`` so that quantization can observe and replace it (an integer
    add with two input scales) and pruning's tracer can tie the channels of both branches.
    """

    def forward(self, a: Any, b: Any) -> Tensor:
        a, b = _as_input(self, a), _as_input(self, b)
        if a.shape != b.shape:
            raise ValueError(f"{self!r}: both inputs must have the same shape, got {a.shape} and {b.shape}")
        return a + b


class Sequential(Module):
    """Children called in order; ``model[i]`` indexes them, ``len(model)`` counts them."""

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for index, module in enumerate(modules):
            if not isinstance(module, Module):
                raise TypeError(f"Sequential: argument {index} is a {type(module).__name__}, not a Module")
            self.add_module(str(index), module)

    def forward(self, x: Any) -> Any:
        for name, module in self.named_children():
            try:
                x = module(x)
            except ValueError as error:
                raise ValueError(f"layer {name!r} ({type(module).__name__}): {error}") from None
        return x

    def __getitem__(self, index: int) -> Module:
        children = list(self.children())
        if isinstance(index, slice):
            return Sequential(*children[index])
        return children[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.children())

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self)), module)
        return self


class ModuleList(Module):
    """A list of modules registered as children ``"0"``, ``"1"``, ...; it has no forward of its own."""

    def __init__(self, modules: Iterable[Module] = ()) -> None:
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> ModuleList:
        self.add_module(str(len(self)), module)
        return self

    def __getitem__(self, index: int) -> Module:
        return list(self.children())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.children())
