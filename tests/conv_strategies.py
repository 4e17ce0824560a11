"""Hypothesis strategies for the geometry of 2-D convolution and pooling, shared by the forward tests
(``test_conv_pool.py``, against loop references) and the gradient tests (``test_ops_grad.py``, which draw smaller
cases because a finite difference costs one forward per input element).

The input is always at least as large as the (dilated) kernel after padding, so every case has an output.
"""

from hypothesis import strategies as st


@st.composite
def conv_cases(draw, max_kernel=4, max_stride=3, max_dilation=3, max_in_per_group=3, max_extra=5, max_batch=3):
    """``(x_shape, weight_shape, with_bias, options)`` of a grouped convolution (depthwise half the time);
    ``options`` holds stride, padding (0 to 2), dilation and groups (1 to 3); the input is at most ``max_extra``
    rows and columns larger than its minimum."""
    groups = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    in_per_group = 1 if depthwise else draw(st.integers(1, max_in_per_group))
    out_per_group = draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel)))
    stride = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation)))
    min_h = max(1, dilation[0] * (kernel[0] - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (kernel[1] - 1) + 1 - 2 * padding[1])
    size = (draw(st.integers(min_h, min_h + max_extra)), draw(st.integers(min_w, min_w + max_extra)))
    x_shape = (draw(st.integers(1, max_batch)), groups * in_per_group, *size)
    weight_shape = (groups * out_per_group, in_per_group, *kernel)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x_shape, weight_shape, draw(st.booleans()), options


@st.composite
def pool_cases(draw, max_kernel=4, max_stride=4, max_size=9, max_batch=3):
    """``(x_shape, kernel, stride, padding)`` of a pooling window; padding is at most half the kernel (PyTorch's
    limit) and the input at most ``max_size`` square."""
    kernel = (draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel)))
    stride = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    h = draw(st.integers(max(1, kernel[0] - 2 * padding[0]), max_size))
    w = draw(st.integers(max(1, kernel[1] - 2 * padding[1]), max_size))
    return (draw(st.integers(1, max_batch)), draw(st.integers(1, max_batch)), h, w), kernel, stride, padding
