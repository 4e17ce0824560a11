"""Empty batches (N = 0) run through every layer and every reference model: float (eval, and train with a
backward pass), prepared (``quant.prepare`` + ``calibrate``) and converted to integers on every kernel backend,
and every other form nanoopt makes of a model (dynamic int8, weight-only, pruned with masks, sparse, shrunk).

The contract (as PyTorch's): a batch of no examples gives a batch of no outputs, of the shape and dtype a
non-empty batch would give with its first axis set to 0; gradients of parameters are zeros (the empty sum);
running statistics and calibrated ranges are left as they were. Every backend returns the same empty shape.
"""

import warnings

import numpy as np
import pytest

import nanoopt as no
from nanoopt import kernels, models, nn, prune, quant

BACKENDS = ["reference", "numba", "auto"] + (["avx2"] if kernels.avx2_available() else [])
CONFIGS = {
    "int8": quant.QuantConfig(),
    "16x8": quant.QuantConfig.int16_activations(),
    "w4a8": quant.QuantConfig.weights4(),
}


class TwoInputs(nn.Module):
    """A conv branch and a 1x1 projection meeting in an ``nn.Add`` (the residual pattern)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.project = nn.Conv2d(3, 4, 1)
        self.add = nn.Add()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.add(self.conv(x), self.project(x)))


# name -> (builder, shape of one example)
LAYERS = {
    "identity": (lambda: nn.Identity(), (5,)),
    "linear": (lambda: nn.Linear(6, 4), (6,)),
    "linear_3d": (lambda: nn.Linear(6, 4), (3, 6)),
    "conv": (lambda: nn.Conv2d(3, 8, 3, padding=1), (3, 6, 6)),
    "conv_strided_dilated": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2), (3, 9, 7)),
    "conv_groups": (lambda: nn.Conv2d(4, 8, 3, groups=2), (4, 5, 5)),
    "conv_depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (4, 5, 5)),
    "conv_deep": (lambda: nn.Conv2d(16, 8, 3, stride=2), (16, 7, 7)),  # depth 144: im2col + GEMM, not thin
    "batchnorm1d": (lambda: nn.BatchNorm1d(6), (6,)),
    "batchnorm1d_3d": (lambda: nn.BatchNorm1d(6), (6, 4)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3), (3, 4, 4)),
    "layernorm": (lambda: nn.LayerNorm(6), (6,)),
    "relu": (lambda: nn.ReLU(), (3, 4)),
    "gelu": (lambda: nn.GELU(), (7,)),
    "sigmoid": (lambda: nn.Sigmoid(), (7,)),
    "tanh": (lambda: nn.Tanh(), (7,)),
    "maxpool": (lambda: nn.MaxPool2d(2), (3, 6, 5)),
    "avgpool": (lambda: nn.AvgPool2d(3, stride=2, padding=1), (3, 6, 5)),
    "adaptive_avgpool": (lambda: nn.AdaptiveAvgPool2d(2), (3, 6, 4)),
    "flatten": (lambda: nn.Flatten(), (3, 2, 2)),
    "dropout": (lambda: nn.Dropout(0.5), (7,)),
    "basic_block": (lambda: models.BasicBlock(3, 4, stride=2), (3, 6, 6)),
    "add": (TwoInputs, (3, 5, 5)),
}

MODELS = {
    "lenet_300_100": (lambda: models.lenet_300_100(in_features=64), (1, 8, 8)),
    "lenet5_8": (lambda: models.lenet5(input_size=8), (1, 8, 8)),
    "lenet5_28": (lambda: models.lenet5(input_size=28), (1, 28, 28)),
    "mlp": (lambda: models.mlp(64, (16, 8)), (64,)),
    "tiny_mlp": (lambda: models.tiny_mlp(), (1, 8, 8)),
    "small_resnet": (lambda: models.small_resnet(widths=(4, 8)), (1, 8, 8)),
}

CASES = {**LAYERS, **MODELS}


def build(name):
    """The module (wrapped in a Sequential when it is a bare layer), a batch of 4 examples and an empty batch."""
    make, shape = CASES[name]
    no.manual_seed(0)
    module = make()
    if name in LAYERS and not isinstance(module, TwoInputs):
        module = nn.Sequential(module)
    x = np.random.default_rng(1).uniform(-2.0, 2.0, size=(4,) + shape).astype(np.float32)
    return module, x, np.zeros((0,) + shape, np.float32)


def assert_empty_like(empty, full):
    """``empty`` has the shape of ``full`` with N = 0, and its dtype."""
    empty = empty.data if isinstance(empty, no.Tensor) else empty
    full = full.data if isinstance(full, no.Tensor) else full
    assert empty.shape == (0,) + full.shape[1:]
    assert empty.dtype == full.dtype


@pytest.mark.parametrize("name", sorted(CASES))
def test_float_eval(name):
    module, x, x0 = build(name)
    module.eval()
    assert_empty_like(module(no.Tensor(x0)), module(no.Tensor(x)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_float_train_and_backward(name):
    """Training mode on an empty batch: empty output, zero parameter gradients, running statistics unchanged."""
    module, x, x0 = build(name)
    module.train()
    full_shape = module(no.Tensor(x)).shape  # (no backward: parameters have no gradients yet)
    before = {key: value.copy() for key, value in module.state_dict().items() if "running" in key}
    inputs = no.Tensor(x0, requires_grad=True)
    out = module(inputs)
    out.sum().backward()
    assert out.shape == (0,) + full_shape[1:]
    assert inputs.grad is not None and inputs.grad.shape == x0.shape
    for key, parameter in module.named_parameters():
        assert parameter.grad is not None, key
        assert parameter.grad.shape == parameter.shape and not parameter.grad.any(), key
    for key, value in before.items():
        np.testing.assert_array_equal(module.state_dict()[key], value, err_msg=key)


def prepared_and_converted(name, config_name):
    module, x, x0 = build(name)
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layers without an integer kernel stay in float (warned)
        prepared = quant.prepare(module, CONFIGS[config_name], example_input=x[:1])
        quant.calibrate(prepared, x, progress=False)
    return prepared, quant.convert(prepared), x, x0


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_prepared_and_integer(name, config_name):
    prepared, integer, x, x0 = prepared_and_converted(name, config_name)
    scales = [q.scale.copy() for q in quant.quantizers(prepared)]
    assert_empty_like(prepared(no.Tensor(x0)), prepared(no.Tensor(x)))
    for before, q in zip(scales, quant.quantizers(prepared), strict=True):
        np.testing.assert_array_equal(q.scale, before)  # calibrated ranges are frozen: an empty batch changes none
    codes = integer.quantize_input(x)
    assert integer.quantize_input(x0).shape == x0.shape
    for backend in BACKENDS:
        with kernels.use_backend(backend):
            try:
                full, full_codes = integer(x), integer.forward_int(codes)
            except RuntimeError as error:  # forced "avx2" on a layer it cannot run (int16 conv, depthwise, ...)
                assert backend == "avx2" and "was forced but cannot run" in str(error)
                continue
            assert_empty_like(integer(x0), full)
            assert_empty_like(integer.forward_int(codes[:0]), full_codes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_conv_path_returns_the_empty_shape(backend):
    """The integer conv on N = 0 through each kernel path: tiles, thin loop, depthwise loop, int16, AVX2 im2col."""
    rng = np.random.default_rng(0)
    layouts = [  # (weight shape, groups, stride, x dtype)
        ((16, 8, 3, 3), 1, 2, np.int8),  # depth 72, stride 2: tiles (or AVX2)
        ((16, 32, 3, 3), 1, 1, np.int8),  # depth 288: tiles (or AVX2)
        ((8, 2, 3, 3), 1, 1, np.int8),  # few taps: the thin loop
        ((4, 1, 3, 3), 4, 1, np.int8),  # depthwise
        ((8, 4, 3, 3), 2, 1, np.int16),  # 16x8
    ]
    for shape, groups, stride, dtype in layouts:
        weight = rng.integers(-127, 128, size=shape).astype(np.int8)
        x0 = np.zeros((0, shape[1] * groups, 9, 9), dtype)
        spec = quant.QuantSpec(bits=np.iinfo(dtype).bits)
        layer = kernels.prepare_conv2d(weight, None, 0, 2**30, 1, 0, spec, stride=stride, padding=1, groups=groups,
                                       x_dtype=dtype)
        expected = kernels.reference.quantized_conv2d(x0, weight, None, 0, 2**30, 1, 0, spec, stride, 1, 1, groups)
        assert expected.shape[0] == 0 and expected.shape[1:] == (shape[0], 5 if stride == 2 else 9, 5 if stride == 2
                                                                   else 9)
        with kernels.use_backend(backend):
            try:
                out = layer(x0)
            except RuntimeError as error:
                assert backend == "avx2" and "was forced but cannot run" in str(error)
                continue
        assert out.shape == expected.shape and out.dtype == expected.dtype, (shape, groups, backend)


def _pruned(model, x):  # masks kept (weight_orig * weight_mask)
    prune.global_unstructured(prune.prunable_parameters(model), amount=0.6)
    return model


def _sparse(model, x, layout):
    for module, name in prune.prunable_parameters(model):
        if isinstance(module, nn.Linear):
            if layout == "csr":
                prune.l1_unstructured(module, name, amount=0.7)
            else:
                prune.nm_sparsity(module, name, n=2, m=4)
    prune.to_sparse(model, format=layout)
    return model


def _shrunk(model, x):
    module, name = prune.prunable_parameters(model)[0]
    prune.ln_structured(module, name, amount=0.5, n=1, dim=0)
    prune.shrink(model, x)
    return model


OTHER_FORMS = {
    "dynamic_int8": lambda model, x: quant.quantize_dynamic(model, bits=8),
    "weight_only_4bit": lambda model, x: quant.quantize_weights(model, bits=4, group_size=8),
    "pruned_masks": _pruned,
    "sparse_csr": lambda model, x: _sparse(model, x, "csr"),
    "sparse_2_4": lambda model, x: _sparse(model, x, "nm"),
    "shrunk": _shrunk,
}


@pytest.mark.parametrize("form", sorted(OTHER_FORMS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_other_compressed_forms(name, form):
    """The other forms nanoopt makes of each model (dynamic int8, weight-only, pruned, sparse, shrunk) on N = 0."""
    module, x, x0 = build(name)
    module.eval()
    compressed = OTHER_FORMS[form](module, x)
    compressed.eval()
    for backend in BACKENDS:
        with kernels.use_backend(backend), no.no_grad():  # (sparse layers are for inference only)
            assert_empty_like(compressed(no.Tensor(x0)), compressed(no.Tensor(x)))
