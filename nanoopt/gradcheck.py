"""Gradient checking: reverse mode against a central finite difference along a random direction.

This is the check of HIPS/autograd's ``check_grads`` (Maclaurin, Duvenaud & Adams, 2015), reduced to one
directional derivative per input. For a function ``fn`` of tensors x_1, ..., x_k with output y, draw a fixed
random cotangent R (shape of y) and form the scalar

    L(x_1, ..., x_k) = sum(fn(x_1, ..., x_k) * R).

Reverse mode gives every gradient g_i = dL/dx_i in one ``backward()``. For each input, draw a random direction
v_i (shape of x_i) and compare the directional derivative <g_i, v_i> with the central difference

    (L(..., x_i + eps v_i, ...) - L(..., x_i - eps v_i, ...)) / (2 eps),

whose error is O(eps^2) from truncation plus O(|L| * 1e-16 / eps) from rounding; everything runs in float64.
A random R tests the whole vector-Jacobian product, not just the gradient of ``sum``; a random v tests every
entry of g_i at once (a wrong entry survives only on a measure-zero set of directions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nanoopt.tensor import Tensor, no_grad


def _objective(output: Any, cotangent: np.ndarray) -> Tensor:
    """L = sum(output * R), as a graph when ``output`` has one."""
    if not isinstance(output, Tensor):
        raise TypeError(f"check_grads: fn must return a Tensor, got {type(output).__name__}")
    if output.dtype != np.float64:
        raise AssertionError(f"check_grads: fn returned dtype {output.dtype} for float64 inputs; the check needs "
                             "float64 throughout (some operation downcast its input)")
    if output.shape != cotangent.shape:
        raise AssertionError(f"check_grads: fn returned shape {output.shape} on one call and {cotangent.shape} "
                             "on another; fn must be deterministic")
    return (output * Tensor(cotangent)).sum()


def check_grads(fn: Callable[..., Tensor], inputs: Sequence[Any], eps: float = 1e-6, rtol: float = 1e-5,
                atol: float = 1e-6, seed: int = 0) -> None:
    """Assert that reverse-mode gradients of ``fn`` agree with central finite differences, input by input.

    Each input is cast to a float64 :class:`Tensor` with ``requires_grad=True``; ``fn(*tensors)`` must return a
    Tensor, be deterministic (seed any randomness inside ``fn``) and not change state between calls. With
    L = sum(fn(x) * R) for a fixed random R, the check for input i passes when

        |<dL/dx_i, v_i> - (L(x_i + eps v_i) - L(x_i - eps v_i)) / (2 eps)| <= atol + rtol * max(|both|)

    for a random direction v_i (entries standard normal). An input that gets no gradient counts as a zero one.

    Raises
    ------
    AssertionError
        naming the input (position and shape) and both numbers, when they disagree.

    Examples
    --------
    >>> import numpy as np
    >>> from nanoopt import ops
    >>> x, w = np.random.default_rng(0).standard_normal((2, 3, 4)), np.ones((4, 5))
    >>> check_grads(lambda a, b: ops.tanh(a @ b), [x, w])
    >>> def wrong_square(a):  # forward a^2, but detach() hides one factor: the backward says a, not 2a
    ...     return a * a.detach()
    >>> check_grads(wrong_square, [x])
    Traceback (most recent call last):
    ...
    AssertionError: check_grads: input 0 (shape (2, 3, 4)): reverse mode ...
    """
    if eps <= 0:
        raise ValueError(f"check_grads: eps must be positive, got {eps}")
    arrays = [np.array(x.data if isinstance(x, Tensor) else x, dtype=np.float64) for x in inputs]
    if not arrays:
        raise ValueError("check_grads: needs at least one input")
    rng = np.random.default_rng(seed)

    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    output = fn(*tensors)
    if not isinstance(output, Tensor):
        raise TypeError(f"check_grads: fn must return a Tensor, got {type(output).__name__}")
    cotangent = rng.standard_normal(output.shape)
    loss = _objective(output, cotangent)
    if loss.requires_grad:
        loss.backward()

    def value_at(position: int, point: np.ndarray) -> float:
        shifted = [Tensor(point if i == position else a.copy()) for i, a in enumerate(arrays)]
        with no_grad():
            return float(_objective(fn(*shifted), cotangent).data)

    for position, (array, tensor) in enumerate(zip(arrays, tensors, strict=True)):
        grad = np.zeros_like(array) if tensor.grad is None else tensor.grad
        if grad.shape != array.shape:
            raise AssertionError(f"check_grads: input {position} has shape {array.shape} but its gradient has "
                                 f"shape {grad.shape}")
        direction = rng.standard_normal(array.shape)
        reverse = float(np.sum(grad * direction))
        numeric = (value_at(position, array + eps * direction) - value_at(position, array - eps * direction)) / (
            2 * eps)
        if not abs(reverse - numeric) <= atol + rtol * max(abs(reverse), abs(numeric)):
            raise AssertionError(f"check_grads: input {position} (shape {array.shape}): reverse mode gives "
                                 f"<grad, v> = {reverse!r}, central finite difference gives {numeric!r} "
                                 f"(difference {abs(reverse - numeric):.3e}, eps={eps}, rtol={rtol}, atol={atol})")
