"""Stateless layer functions and losses, with PyTorch's names and semantics, built on :mod:`nanoopt.ops`.

These check their inputs (shapes, dtypes, ranges) and then call one primitive or compose a few. Losses:

* ``cross_entropy(logits, target, label_smoothing)``: -(1/N) sum_n sum_c t_nc log softmax(z_n)_c;
* ``mse_loss(a, b)``: mean((a - b)^2);
* ``kl_div(log_q, p, reduction="batchmean")``: (1/N) sum p (log p - log_q), PyTorch's argument order
  (the *input* is log-probabilities, the *target* probabilities, or log-probabilities with ``log_target``).

>>> import numpy as np, nanoopt as no
>>> from nanoopt.nn import functional as F
>>> logits = no.Tensor(np.zeros((2, 4)), requires_grad=True)
>>> round(F.cross_entropy(logits, np.array([0, 3])).item(), 4)  # log(4)
1.3863
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nanoopt import ops
from nanoopt.nn.attention_functional import embedding, scaled_dot_product_attention  # noqa: F401 (PyTorch's F names)
from nanoopt.ops import _pair, conv_output_size
from nanoopt.tensor import Tensor


def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(x)


def _check_finite_shape(x: Tensor, ndim: int, name: str, what: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D input {what}, got shape {x.shape}")


# ----------------------------------------------------------------- layers
def linear(x: Any, weight: Any, bias: Any = None) -> Tensor:
    """y = x W^T + b, with W of shape (out_features, in_features) (PyTorch layout)."""
    x, weight = _tensor(x), _tensor(weight)  # shapes are checked by the primitive (ops.Linear)
    return ops.Linear.apply(x, weight) if bias is None else ops.Linear.apply(x, weight, bias)


def conv2d(x: Any, weight: Any, bias: Any = None, stride: int | Sequence[int] = 1,
           padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1) -> Tensor:
    """2-D convolution (cross-correlation), NCHW input, weight (OC, C/groups, KH, KW)."""
    x, weight = _tensor(x), _tensor(weight)
    _check_finite_shape(x, 4, "conv2d", "(N, C, H, W)")
    oc, cg, kh, kw = weight.shape
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if groups < 1 or x.shape[1] != cg * groups or oc % groups:
        raise ValueError(f"conv2d: input has {x.shape[1]} channels; weight {weight.shape} with groups={groups} "
                         f"expects {cg * groups} input channels and out channels divisible by groups")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"conv2d: stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={stride}, dilation={dilation}, padding={padding}")
    oh = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"conv2d: input {x.shape[2]}x{x.shape[3]} (padding {padding}) is smaller than the "
                         f"dilated kernel {kh}x{kw} (dilation {dilation})")
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if bias is None:
        return ops.Conv2d.apply(x, weight, **options)
    return ops.Conv2d.apply(x, weight, bias, **options)


def _pool_args(x: Tensor, kernel_size: Any, stride: Any, padding: Any, name: str):
    _check_finite_shape(x, 4, name, "(N, C, H, W)")
    kernel = _pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else _pair(stride, "stride")
    padding = _pair(padding, "padding")
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0 or padding[0] * 2 > kernel[0] \
            or padding[1] * 2 > kernel[1]:
        raise ValueError(f"{name}: need kernel >= 1, stride >= 1, 0 <= padding <= kernel/2; got kernel={kernel}, "
                         f"stride={stride}, padding={padding}")
    if x.shape[2] + 2 * padding[0] < kernel[0] or x.shape[3] + 2 * padding[1] < kernel[1]:
        raise ValueError(f"{name}: input {x.shape[2]}x{x.shape[3]} is smaller than the kernel {kernel}")
    return kernel, stride, padding


def max_pool2d(x: Any, kernel_size: int | Sequence[int], stride: Any = None, padding: Any = 0) -> Tensor:
    """Max pooling (stride defaults to the kernel size)."""
    x = _tensor(x)
    kernel, stride, padding = _pool_args(x, kernel_size, stride, padding, "max_pool2d")
    return ops.MaxPool2d.apply(x, kernel=kernel, stride=stride, padding=padding)


def avg_pool2d(x: Any, kernel_size: int | Sequence[int], stride: Any = None, padding: Any = 0) -> Tensor:
    """Average pooling (stride defaults to the kernel size; padded zeros count in the divisor)."""
    x = _tensor(x)
    kernel, stride, padding = _pool_args(x, kernel_size, stride, padding, "avg_pool2d")
    return ops.AvgPool2d.apply(x, kernel=kernel, stride=stride, padding=padding)


def adaptive_avg_pool2d(x: Any, output_size: int | Sequence[int]) -> Tensor:
    """Average pooling to a fixed output size, with PyTorch's bin boundaries."""
    x = _tensor(x)
    _check_finite_shape(x, 4, "adaptive_avg_pool2d", "(N, C, H, W)")
    size = _pair(output_size, "output_size")
    if min(size) < 1:
        raise ValueError(f"adaptive_avg_pool2d: output_size must be >= 1, got {size}")
    return ops.AdaptiveAvgPool2d.apply(x, output_size=size)


def batch_norm(x: Any, running_mean: np.ndarray | None, running_var: np.ndarray | None, weight: Any, bias: Any,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalisation over all axes but 1; running statistics (ndarrays) are updated in place in training."""
    x = _tensor(x)
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"batch_norm: expected a 2-D, 3-D or 4-D input (N, C, ...), got shape {x.shape}")
    if training and x.size == 0 and x.shape[1]:  # an empty batch (PyTorch: empty output, statistics unchanged)
        channels = x.shape[1]
        return ops.BatchNorm.apply(x, weight, bias, running_mean=np.zeros(channels, x.dtype),
                                   running_var=np.ones(channels, x.dtype), training=False, momentum=momentum, eps=eps)
    if training and x.size // x.shape[1] < 2:
        raise ValueError(f"batch_norm: training needs more than one value per channel, got input {x.shape}")
    return ops.BatchNorm.apply(x, weight, bias, running_mean=running_mean, running_var=running_var,
                               training=training, momentum=momentum, eps=eps)


def layer_norm(x: Any, normalized_shape: Sequence[int], weight: Any, bias: Any, eps: float = 1e-5) -> Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` axes."""
    x = _tensor(x)
    normalized_shape = tuple(normalized_shape)
    if x.shape[x.ndim - len(normalized_shape):] != normalized_shape:
        raise ValueError(f"layer_norm: expected input (..., {', '.join(map(str, normalized_shape))}), "
                         f"got shape {x.shape}")
    return ops.LayerNorm.apply(x, weight, bias, ndim_normalised=len(normalized_shape), eps=eps)


relu = ops.relu
gelu = ops.gelu
sigmoid = ops.sigmoid
tanh = ops.tanh
dropout = ops.dropout


def _dim(dim: int, axis: int | None, where: str) -> int:
    """``dim`` (PyTorch's spelling), or ``axis`` (NumPy's, kept: DESIGN.md's public API names it) when given."""
    if axis is None:
        return dim
    if dim != -1 and dim != axis:
        raise TypeError(f"{where}: got dim={dim} and axis={axis}; give one of them (dim is PyTorch's name)")
    return axis


def softmax(x: Any, dim: int = -1, *, axis: int | None = None) -> Tensor:
    """``exp(x_i) / sum_j exp(x_j)`` along ``dim`` (PyTorch's name; ``axis=`` is accepted too), computed stably
    (max subtracted).

    >>> import nanoopt as no
    >>> softmax(no.Tensor([[0.0, 0.0]]), dim=1).data.tolist()
    [[0.5, 0.5]]
    """
    return ops.softmax(x, axis=_dim(dim, axis, "softmax"))


def log_softmax(x: Any, dim: int = -1, *, axis: int | None = None) -> Tensor:
    """``x_i - log sum_j exp(x_j)`` along ``dim`` (PyTorch's name; ``axis=`` is accepted too), computed stably.

    >>> import nanoopt as no
    >>> round(float(log_softmax(no.Tensor([[0.0, 0.0]]), dim=1).data[0, 0]), 4)
    -0.6931
    >>> round(float(log_softmax(no.Tensor([[0.0, 0.0]]), axis=-1).data[0, 0]), 4)   # DESIGN.md's spelling
    -0.6931
    """
    return ops.log_softmax(x, axis=_dim(dim, axis, "log_softmax"))


# ----------------------------------------------------------------- losses
def cross_entropy(logits: Any, target: Any, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits (N, C) against class indices (N,) or class probabilities (N, C).

    >>> import numpy as np, nanoopt as no
    >>> z = no.Tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> round(cross_entropy(z, np.array([0, 1])).item(), 4)
    0.1269
    """
    logits = _tensor(logits)
    _check_finite_shape(logits, 2, "cross_entropy", "of logits (N, C)")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    n, classes = logits.shape
    if isinstance(target, Tensor) and target.ndim == 2:
        if target.shape != logits.shape:
            raise ValueError(f"cross_entropy: probability targets must have the logits' shape {logits.shape}, "
                             f"got {target.shape}")
        return ops.CrossEntropy.apply(logits, target, label_smoothing=label_smoothing, reduction=reduction)
    labels = np.asarray(target.data if isinstance(target, Tensor) else target)
    if labels.ndim == 2:
        if labels.shape != logits.shape:
            raise ValueError(f"cross_entropy: probability targets must have the logits' shape {logits.shape}, "
                             f"got {labels.shape}")
        return ops.CrossEntropy.apply(logits, labels, label_smoothing=label_smoothing, reduction=reduction)
    if labels.shape != (n,):
        raise ValueError(f"cross_entropy: expected {n} class indices for logits {logits.shape}, got shape "
                         f"{labels.shape}")
    if labels.dtype.kind == "b" or (labels.dtype.kind not in "iu" and not np.array_equal(labels, np.round(labels))):
        raise TypeError(f"cross_entropy: class indices must be integers, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"cross_entropy: class indices must be in [0, {classes - 1}], got range "
                         f"[{labels.min()}, {labels.max()}]")
    return ops.CrossEntropy.apply(logits, Tensor(labels.astype(np.float64)), label_smoothing=label_smoothing,
                                  reduction=reduction)


def nll_loss(log_probs: Any, target: Any) -> Tensor:
    """Mean negative log-likelihood of log-probabilities (N, C) at the target indices (N,)."""
    log_probs = _tensor(log_probs)
    labels = np.asarray(target.data if isinstance(target, Tensor) else target).astype(np.int64)
    if log_probs.ndim != 2 or labels.shape != (log_probs.shape[0],):
        raise ValueError(f"nll_loss: expected log-probs (N, C) and targets (N,), got {log_probs.shape} and "
                         f"{labels.shape}")
    return -log_probs[np.arange(len(labels)), labels].mean()


def mse_loss(prediction: Any, target: Any, reduction: str = "mean") -> Tensor:
    """Mean squared error mean((prediction - target)^2); shapes must match exactly (no silent broadcasting)."""
    prediction, target = _tensor(prediction), _tensor(target)
    if prediction.shape != target.shape:
        raise ValueError(f"mse_loss: prediction shape {prediction.shape} differs from target shape {target.shape}")
    squared = (prediction - target) ** 2
    if reduction == "mean":
        return squared.mean()
    if reduction == "sum":
        return squared.sum()
    if reduction == "none":
        return squared
    raise ValueError(f"mse_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def kl_div(input: Any, target: Any, reduction: str = "batchmean", log_target: bool = False) -> Tensor:  # noqa: A002
    """KL(target || q) with ``input = log q``: sum target * (log target - input), PyTorch's convention.

    ``reduction="batchmean"`` divides the sum by the batch size (the mathematically correct KL per sample);
    ``"mean"`` divides by the number of elements, as PyTorch does (usually not what you want); ``"sum"``.
    Terms with target == 0 contribute 0 (0 log 0 = 0).
    """
    input, target = _tensor(input), _tensor(target)
    if input.shape != target.shape:
        raise ValueError(f"kl_div: input shape {input.shape} differs from target shape {target.shape}")
    if log_target:
        pointwise = target.exp() * (target - input)
    else:
        positive = target.data > 0
        safe_log = ops.where(positive, target, 1.0).log()  # a graph, so a target that requires grad gets one
        pointwise = ops.where(positive, target * (safe_log - input), 0.0)
    if reduction == "batchmean":
        return pointwise.sum() / input.shape[0]
    if reduction == "sum":
        return pointwise.sum()
    if reduction == "mean":
        return pointwise.mean()
    if reduction == "none":
        return pointwise
    raise ValueError(f"kl_div: reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}")
