"""Tensor and backward(): accumulation (PyTorch semantics), zero_grad, retain_graph, no_grad, detach, dtypes, depth.

Accumulation is documented PyTorch behaviour, not an accident (micrograd issues #53, #102): every backward() *adds*
d(root)/d(leaf) to a leaf's ``.grad``; ``zero_grad()`` clears it; intermediate tensors keep no ``.grad``.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

import nanoopt as no
from nanoopt import nn, ops
from nanoopt.nn import functional as F

FEW = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)
shapes = array_shapes(min_dims=0, max_dims=3, max_side=4)


def quartic(x):
    """A graph with shared subexpressions: sum(tanh(x) * x ** 2); gradient (1 - tanh^2) x^2 + 2 x tanh."""
    return (x.tanh() * x**2).sum()


def quartic_grad(x):
    return (1 - np.tanh(x) ** 2) * x**2 + 2 * x * np.tanh(x)


# ===================================================================== accumulation and zero_grad
@FEW
@given(shapes, seeds, st.integers(1, 4))
def test_leaf_gradients_add_up_across_backward_calls(shape, seed, calls):
    data = np.random.default_rng(seed).standard_normal(shape)
    x = no.Tensor(data, requires_grad=True)
    for _ in range(calls):
        quartic(x).backward()  # a fresh graph each time, as in a training loop without zero_grad
    np.testing.assert_allclose(x.grad, calls * quartic_grad(data), rtol=1e-12, atol=1e-12)


def test_retained_graph_walked_twice_accumulates():
    x = no.Tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_array_equal(x.grad, [4.0, 8.0])


def test_zero_grad_starts_a_fresh_accumulation():
    x = no.Tensor([3.0], requires_grad=True)
    (x * x).sum().backward()
    x.zero_grad()
    assert x.grad is None
    (x * 5).sum().backward()
    np.testing.assert_array_equal(x.grad, [5.0])


def test_module_zero_grad_clears_every_parameter():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    F.mse_loss(model(no.Tensor(np.ones((5, 3)))), no.Tensor(np.zeros((5, 2)))).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_first_gradient_is_a_copy_not_an_alias_of_an_internal_buffer():
    x = no.Tensor([1.0, 2.0], requires_grad=True)
    seed_gradient = np.array([1.0, 1.0], dtype=np.float32)
    (x + 0).backward(seed_gradient)
    x.grad += 1  # an optimiser scaling .grad in place must not write into the caller's array
    np.testing.assert_array_equal(seed_gradient, [1.0, 1.0])


def test_intermediate_tensors_keep_no_grad():
    x = no.Tensor([1.0, 2.0], requires_grad=True)
    hidden = x * 3
    (hidden * hidden).sum().backward()
    assert hidden.grad is None and not hidden.is_leaf and x.is_leaf
    np.testing.assert_array_equal(x.grad, [18.0, 36.0])


def test_constant_inputs_get_no_gradient():
    x, c = no.Tensor([1.0], requires_grad=True), no.Tensor([2.0])
    (x * c).sum().backward()
    assert c.grad is None and x.grad.tolist() == [2.0]


# ===================================================================== retain_graph and backward's errors
def test_second_backward_without_retain_graph_raises_a_clear_error():
    x = no.Tensor([1.0, 2.0], requires_grad=True)
    y = (x.exp() * x).sum()
    y.backward()
    first = x.grad.copy()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()
    np.testing.assert_array_equal(x.grad, first)


def test_backward_through_a_freed_shared_subgraph_raises():
    x = no.Tensor([1.0, 2.0], requires_grad=True)
    shared = x * x
    shared.sum().backward()
    with pytest.raises(RuntimeError, match="second time"):
        (shared * 2).sum().backward()


def test_backward_on_a_non_scalar_needs_a_gradient():
    y = no.Tensor(np.ones((2, 3)), requires_grad=True) * 2
    with pytest.raises(RuntimeError, match=r"non-scalar tensor of shape \(2, 3\)"):
        y.backward()


def test_backward_with_an_explicit_gradient_is_a_vector_jacobian_product():
    x = no.Tensor(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), requires_grad=True)
    y = x * x
    y.backward(np.full((2, 3), 0.5))
    np.testing.assert_array_equal(x.grad, x.data)


def test_backward_gradient_of_the_wrong_shape_is_refused():
    y = no.Tensor(np.ones((2, 3)), requires_grad=True) * 2
    with pytest.raises(ValueError, match=r"expected shape \(2, 3\), got \(3, 2\)"):
        y.backward(np.ones((3, 2)))


def test_backward_on_a_tensor_without_grad_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        (no.Tensor([1.0]) * 2).sum().backward()


def test_backward_on_a_one_element_non_scalar_uses_one():
    x = no.Tensor([[2.0]], requires_grad=True)
    (x * 3).backward()
    assert x.grad.tolist() == [[3.0]]


# ===================================================================== no_grad, enable_grad, detach
def test_no_grad_context_records_nothing():
    w = no.Tensor([1.0, 2.0], requires_grad=True)
    with no.no_grad():
        assert not no.is_grad_enabled()
        y = (w * 2).exp().sum()
    assert no.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()


def test_no_grad_as_a_decorator_records_nothing():
    w = no.Tensor([1.0], requires_grad=True)

    @no.no_grad()
    def predict(v):
        return v * 3

    out = predict(w)
    assert not out.requires_grad and out._ctx is None
    assert no.is_grad_enabled()
    assert predict(w).data.tolist() == [3.0]  # the decorator is reusable


def test_no_grad_restores_the_mode_after_an_exception_and_nests_with_enable_grad():
    w = no.Tensor([1.0], requires_grad=True)
    with pytest.raises(KeyError), no.no_grad():
        raise KeyError("inside no_grad")
    assert no.is_grad_enabled()
    with no.no_grad():
        with no.enable_grad():
            assert (w * 2).requires_grad
        assert not (w * 2).requires_grad
    assert (w * 2).requires_grad


def test_no_grad_in_a_module_forward_keeps_parameters_trainable():
    model = nn.Linear(2, 2)
    with no.no_grad():
        out = model(no.Tensor(np.ones((1, 2))))
    assert not out.requires_grad and all(p.requires_grad for p in model.parameters())


def test_detach_shares_data_and_cuts_the_graph():
    x = no.Tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    d = y.detach()
    assert not d.requires_grad and d.is_leaf and d.data is y.data
    (x * d).sum().backward()  # d is a constant: d(x * d)/dx = d
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])


# ===================================================================== dtypes
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.bool_, np.float16])
def test_integer_boolean_and_half_arrays_become_float32(dtype):
    t = no.Tensor(np.array([[1, 0], [1, 1]]).astype(dtype))
    assert t.dtype == np.float32
    np.testing.assert_array_equal(t.data, [[1, 0], [1, 1]])


def test_float64_is_kept_and_float32_is_not_copied():
    data64, data32 = np.ones(3), np.ones(3, dtype=np.float32)
    assert no.Tensor(data64).dtype == np.float64
    assert no.Tensor(data32).data is data32


def test_python_numbers_and_lists_become_float32():
    assert no.Tensor([1, 2]).dtype == np.float32
    assert no.Tensor(2.5).dtype == np.float32
    assert no.Tensor([1.0], dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("bad", [np.array([1 + 2j]), np.array(["a"]), np.array([object()])])
def test_non_numeric_data_is_refused(bad):
    with pytest.raises(TypeError, match="dtype"):
        no.Tensor(bad)


def test_an_integer_dtype_request_is_refused():
    with pytest.raises(TypeError, match="float type"):
        no.Tensor([1, 2], dtype=np.int32)


@pytest.mark.parametrize("build", [
    lambda x: (2.0 * x - 1.5 + x / 3.0 + x**2 + 2.0**x).sum(),
    lambda x: (x.softmax() * x.log_softmax()).sum(),
    lambda x: F.gelu(x, "tanh").max(axis=1).mean() + F.gelu(x).var(),
    lambda x: F.cross_entropy(x.reshape(2, 6), np.array([0, 5]), label_smoothing=0.1),
    lambda x: F.conv2d(x.reshape(1, 1, 3, 4), x.reshape(2, 1, 2, 3)[:, :, :2, :2], padding=1).sum(),
    lambda x: F.max_pool2d(x.reshape(1, 1, 3, 4), 2, padding=1).sum() + F.avg_pool2d(x.reshape(1, 1, 3, 4), 2).sum(),
    lambda x: F.batch_norm(x.reshape(3, 4), None, None, np.ones(4, np.float32), np.zeros(4, np.float32),
                           training=True).tanh().sum(),
    lambda x: F.dropout(x, 0.5).sigmoid().sum(),
])
def test_float32_stays_float32_forward_and_backward(build):
    x = no.Tensor(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), requires_grad=True)
    out = build(x)
    out.backward()
    assert out.dtype == np.float32 and x.grad.dtype == np.float32


# ===================================================================== graph shapes
def test_a_deep_chain_does_not_hit_the_recursion_limit():
    x = no.Tensor([1.0], requires_grad=True, dtype=np.float64)
    y = x
    for _ in range(5000):
        y = y * 1.0 + x  # y_k = y_{k-1} + x, so dy/dx = 5001
    y.sum().backward()
    assert x.grad.tolist() == [5001.0]


def test_diamond_graph_gradient():
    # a = 2x; b = a + 1; c = 3a; d = b * c = (2x + 1) 6x = 12 x^2 + 6x; dd/dx = 24 x + 6
    x = no.Tensor([0.5, -1.0, 2.0], requires_grad=True, dtype=np.float64)
    a = x * 2
    d = (a + 1) * (a * 3)
    d.sum().backward()
    np.testing.assert_allclose(x.grad, 24 * x.data + 6, rtol=1e-15)


def test_each_primitive_backward_runs_once_per_call(monkeypatch):
    calls = []
    original = ops.Mul.backward

    def counting(ctx, grad):
        calls.append(1)
        return original(ctx, grad)

    monkeypatch.setattr(ops.Mul, "backward", staticmethod(counting))
    x = no.Tensor([1.0], requires_grad=True)
    shared = x * 2  # one Mul, feeding four consumers
    (shared + shared + shared.exp() + shared.tanh()).sum().backward()
    assert len(calls) == 1
    np.testing.assert_allclose(x.grad, [2 * (2 + np.exp(2.0) + 1 - np.tanh(2.0) ** 2)], rtol=1e-6)


def test_same_tensor_as_both_operands():
    x = no.Tensor([3.0], requires_grad=True)
    (x * x).sum().backward()
    assert x.grad.tolist() == [6.0]


def test_iterating_and_item():
    t = no.Tensor(np.arange(6.0).reshape(3, 2))
    assert [row.shape for row in t] == [(2,), (2,), (2,)]
    assert no.Tensor([[4.0]]).item() == 4.0
    with pytest.raises(ValueError, match=r"one element, got shape \(3, 2\)"):
        t.item()


def test_tensor_indices_must_be_whole_numbers():
    x = no.Tensor(np.arange(6.0).reshape(3, 2))
    assert x[no.Tensor([2, 0])].data.tolist() == [[4.0, 5.0], [0.0, 1.0]]
    with pytest.raises(TypeError, match="whole numbers"):
        x[no.Tensor([0.7])]


def test_grad_mode_is_per_thread():
    """no_grad in one thread leaves recording on in another, and every thread ends where it started."""
    import threading

    from nanoopt.tensor import is_grad_enabled, no_grad

    inside, barrier = [], threading.Barrier(2)

    def worker(use_no_grad: bool) -> None:
        for _ in range(200):
            if use_no_grad:
                with no_grad():
                    barrier.wait()
                    inside.append(("off", is_grad_enabled()))
                    barrier.wait()
            else:
                barrier.wait()
                inside.append(("on", is_grad_enabled()))
                barrier.wait()

    threads = [threading.Thread(target=worker, args=(flag,)) for flag in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(inside)) == [("off", False), ("on", True)]
    assert is_grad_enabled()
