"""The small PyTorch CNN the interop tests read, and the script that wrote the committed fixtures.

    PYTHONPATH=. python tests/interop/torch_digits_cnn.py      # needs torch; rewrites tests/interop/fixtures/

The fixtures let the checkpoint reader be tested where torch is not installed:

* ``digits_cnn.pth``: ``torch.save({"state_dict": model.state_dict(), "epoch": E, "test_accuracy": a})`` of
  :func:`torch_digits_cnn` trained by :func:`train_torch_digits_cnn` on the bundled 8x8 digits (zip format);
* ``digits_cnn_expected.npz``: every state-dict array as torch holds it (``sd/<key>``) and torch's eval-mode
  logits on the whole digits test split (``logits``);
* ``digits_cnn.onnx``: the same trained model through ``torch.onnx.export`` (TorchScript exporter, opset 20; it
  folds the BatchNorm into the first convolution);
* ``tensors.pth`` / ``tensors_legacy.pth``: the same dict of awkward tensors (float16, bfloat16, int8, bool,
  float64, a transposed view, slices sharing one storage, a 0-d and an empty tensor) in the zip and in the legacy
  (``_use_new_zipfile_serialization=False``) format; ``tensors_expected.npz``: what each must read as (bfloat16
  as float32).

Nothing here imports torch at module level, so the test suite can import this file without torch.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np

from nanoopt import data, nn

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def nanoopt_digits_cnn() -> nn.Sequential:
    """The nanoopt twin of :func:`torch_digits_cnn`: the same layers under the same state-dict names."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),    # (N, 8, 4, 4)
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),                      # (N, 16, 2, 2)
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10),                                         # (N, 10)
    )


def torch_digits_cnn() -> Any:
    """Conv 3x3 (8) - BN - ReLU - maxpool - conv 3x3 (16) - ReLU - avgpool - flatten - linear (10), for 8x8."""
    import torch.nn as tnn

    return tnn.Sequential(
        tnn.Conv2d(1, 8, 3, padding=1), tnn.BatchNorm2d(8), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(8, 16, 3, padding=1), tnn.ReLU(), tnn.AvgPool2d(2),
        tnn.Flatten(), tnn.Linear(16 * 2 * 2, 10),
    )


def train_torch_digits_cnn(epochs: int = 30, seed: int = 0) -> Any:
    """Train :func:`torch_digits_cnn` with torch (SGD, momentum 0.9, lr 0.05, batch 32) on the digits train split;
    returns the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    model = torch_digits_cnn()
    images, labels = data.load_digits("train")
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            batch = order[start:start + 32]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def awkward_tensors() -> Any:
    """Tensors that exercise every path of the reader: dtypes, strides, offsets and shared storages."""
    import torch

    torch.manual_seed(1)
    base = torch.randn(4, 6)
    shared = torch.arange(24, dtype=torch.float32)
    return OrderedDict([
        ("float16", torch.randn(3, 5).half()),
        ("bfloat16", torch.randn(7).to(torch.bfloat16)),
        ("int8", torch.randint(-128, 128, (2, 3, 4), dtype=torch.int8)),
        ("uint8", torch.randint(0, 256, (5,), dtype=torch.uint8)),
        ("int64", torch.arange(-3, 3)),
        ("int32", torch.arange(6, dtype=torch.int32).reshape(2, 3)),
        ("bool", torch.tensor([True, False, True])),
        ("float64", torch.randn(2, 2, dtype=torch.float64)),
        ("transposed", base.t()),                         # non-contiguous: strides (1, 6)
        ("column", base[:, 2]),                           # offset 2, stride 6
        ("every_other", base[::2, 1::2]),                 # strides (12, 2), offset 1
        ("shared_a", shared[:12].view(3, 4)),             # two tensors on one storage
        ("shared_b", shared[12:].view(2, 6)),
        ("shared_whole", shared),
        ("scalar", torch.tensor(2.5)),
        ("empty", torch.zeros(0, 3)),
    ])


def expected_arrays(tensors: Any) -> dict[str, np.ndarray]:
    import torch

    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy().copy() for k, v in tensors.items()}


def main() -> None:
    import torch

    os.makedirs(FIXTURES, exist_ok=True)
    model = train_torch_digits_cnn()
    images, labels = data.load_digits("test")
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    accuracy = float((logits.argmax(1) == labels).mean())
    state = model.state_dict()
    torch.save({"state_dict": state, "epoch": 30, "test_accuracy": accuracy},
               os.path.join(FIXTURES, "digits_cnn.pth"))
    np.savez(os.path.join(FIXTURES, "digits_cnn_expected.npz"), logits=logits,
             **{f"sd/{k}": v.numpy() for k, v in state.items()})
    torch.onnx.export(model, (torch.from_numpy(images[:1]),), os.path.join(FIXTURES, "digits_cnn.onnx"),
                      dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    tensors = awkward_tensors()
    torch.save(tensors, os.path.join(FIXTURES, "tensors.pth"))
    torch.save(tensors, os.path.join(FIXTURES, "tensors_legacy.pth"), _use_new_zipfile_serialization=False)
    np.savez(os.path.join(FIXTURES, "tensors_expected.npz"), **expected_arrays(tensors))
    print(f"wrote {FIXTURES}: torch test accuracy {100 * accuracy:.2f}%")


if __name__ == "__main__":
    main()
