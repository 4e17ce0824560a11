"""Trainable adapters between a student's and a teacher's feature shapes (the FitNets regressor).

Romero et al. 2015 ("FitNets", section 2.2) train a regressor r on top of the student's guided layer so that
r(v) has the shape of the teacher's hint u; they use a convolution rather than a fully connected map because it
needs far fewer weights: for maps of sizes (C_s, H_s, W_s) -> (C_t, H_t, W_t) a kernel of size
(H_s - H_t + 1) x (W_s - W_t + 1). :class:`FeatureAdapter` picks the map from the two shapes:

=========================================  =====================================================
student shape -> teacher shape (no batch)   adapter
=========================================  =====================================================
(D_s,) -> (D_t,)                            Linear(D_s, D_t)
(C_s, H, W) -> (C_t, H, W)                  Conv2d(C_s, C_t, 1)  (a 1x1 convolution)
(C_s, H_s, W_s) -> (C_t, H_t, W_t), H_s >=  Conv2d(C_s, C_t, (H_s - H_t + 1, W_s - W_t + 1))  (FitNets)
H_t and W_s >= W_t
anything else (e.g. an MLP's vector to a    flatten, Linear(prod(student), prod(teacher)), reshape
CNN's (C, H, W) maps: cross-model KD)
=========================================  =====================================================

The adapter belongs to the distillation objective, not to the student: it is trained with the student and
thrown away afterwards, so the deployed student keeps its size.

>>> import numpy as np, nanoopt as no
>>> adapter = FeatureAdapter((64,), (16, 5, 5))       # MLP hidden layer -> LeNet-5's second conv block
>>> adapter(no.Tensor(np.zeros((2, 64)))).shape
(2, 16, 5, 5)
>>> type(FeatureAdapter((8, 14, 14), (16, 10, 10)).map).__name__, FeatureAdapter((8, 14, 14), (16, 10, 10)).kind
('Conv2d', 'fitnets-conv 5x5')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nanoopt import nn
from nanoopt.tensor import Tensor


def _shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    try:
        result = tuple(int(size) for size in shape)
    except TypeError:
        raise TypeError(f"FeatureAdapter: {name} shape must be a sequence of ints, got {shape!r}") from None
    if not result or min(result) < 1:
        raise ValueError(f"FeatureAdapter: {name} shape (without the batch axis) must be non-empty with positive "
                         f"sizes, got {result}")
    return result


class FeatureAdapter(nn.Module):
    """Map student features of shape (N, *student_shape) to (N, *teacher_shape); see the module docstring.

    Attributes
    ----------
    map : the trainable layer (Linear or Conv2d).
    kind : which of the four cases applies ("linear", "1x1-conv", "fitnets-conv KxK", "flatten-linear").
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        self.student_shape = _shape(student_shape, "student")
        self.teacher_shape = _shape(teacher_shape, "teacher")
        source, target = self.student_shape, self.teacher_shape
        if len(source) == 1 and len(target) == 1:
            self.kind, self.map = "linear", nn.Linear(source[0], target[0])
        elif len(source) == 3 and len(target) == 3 and source[1] >= target[1] and source[2] >= target[2]:
            kernel = (source[1] - target[1] + 1, source[2] - target[2] + 1)
            self.kind = "1x1-conv" if kernel == (1, 1) else f"fitnets-conv {kernel[0]}x{kernel[1]}"
            self.map = nn.Conv2d(source[0], target[0], kernel)
        else:
            self.kind = "flatten-linear"
            self.map = nn.Linear(int(np.prod(source)), int(np.prod(target)))

    def forward(self, x: Any) -> Tensor:
        x = x if isinstance(x, Tensor) else Tensor(x)
        if tuple(x.shape[1:]) != self.student_shape:
            raise ValueError(f"FeatureAdapter: expected student features (N, {', '.join(map(str, self.student_shape))}"
                             f"), got shape {x.shape}")
        if self.kind == "flatten-linear":
            return self.map(x.reshape(x.shape[0], -1)).reshape((x.shape[0], *self.teacher_shape))
        return self.map(x)

    def extra_repr(self) -> str:
        return f"{self.student_shape} -> {self.teacher_shape}, {self.kind}"
