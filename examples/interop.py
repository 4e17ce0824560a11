"""Interop end to end: a PyTorch-trained CNN comes in, is compressed here, and goes out as ONNX.

    python examples/interop.py          # needs the extras: pip install 'nanoopt[onnx]' (torch optional)

1. read the CNN's ``.pth`` checkpoint without torch (restricted unpickler: tensors and dicts only) into the same
   layers written in nanoopt, and check its outputs against PyTorch's (within 1e-5). With torch installed the CNN
   is trained here with torch; otherwise the committed checkpoint ``tests/interop/fixtures/digits_cnn.pth`` and
   torch's logits saved beside it are used;
2. quantize it to int8 (post-training, 256 calibration images) and compare accuracy;
3. export float and int8 models to ONNX (int8 as QDQ: QuantizeLinear/DequantizeLinear around float operators) and
   run them in ONNX Runtime over the whole test split: float within 1e-5, int8 argmax identical and at most one
   output step apart (ONNX Runtime requantizes with a float multiplier, nanoopt with a fixed-point one); written
   as integer operators with nanoopt's requantization spelled out, ONNX Runtime matches bit for bit;
4. the same CNN exported by ``torch.onnx.export`` and imported with ``no.onnx.load`` gives the same outputs.
"""

import os
import sys
import tempfile
import warnings

import numpy as np

import nanoopt as no
from nanoopt import data, nn, quant

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "interop", "fixtures")


def nanoopt_cnn() -> nn.Sequential:
    """The CNN written in nanoopt, with the layer order (hence the state-dict names) of the PyTorch one."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),    # (N, 8, 4, 4)
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),                      # (N, 16, 2, 2)
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10),                                         # (N, 10)
    )


def torch_checkpoint(workdir: str, images: np.ndarray) -> tuple[str, np.ndarray, str | None]:
    """(path of a .pth, torch's logits on ``images``, path of torch's ONNX export or None)."""
    try:
        import torch
    except ImportError:
        logits = np.load(os.path.join(FIXTURES, "digits_cnn_expected.npz"))["logits"]
        print("torch is not installed: using the committed checkpoint and torch's saved outputs")
        return os.path.join(FIXTURES, "digits_cnn.pth"), logits, os.path.join(FIXTURES, "digits_cnn.onnx")
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "interop"))
    from torch_digits_cnn import train_torch_digits_cnn

    model = train_torch_digits_cnn(epochs=30, seed=0)
    path = os.path.join(workdir, "digits_cnn.pth")
    torch.save({"state_dict": model.state_dict(), "epoch": 30}, path)     # a wrapped state dict, as scripts do
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    onnx_path = os.path.join(workdir, "torch_export.onnx")
    with warnings.catch_warnings():  # the TorchScript exporter (the other one needs onnxscript) is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.from_numpy(images[:1]),), onnx_path, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return path, logits, onnx_path


def agreement(ours: np.ndarray, reference: np.ndarray) -> str:
    """Largest absolute difference, and whether every element is within 1e-5 (absolute + relative)."""
    within = np.allclose(ours, reference, rtol=1e-5, atol=1e-5)
    return f"max |diff| = {np.abs(ours - reference).max():.2e} ({'within' if within else 'NOT within'} 1e-5)"


def main() -> None:
    train, test = data.load_digits("train"), data.load_digits("test")
    images, labels = test
    workdir = tempfile.mkdtemp()

    # 1. the checkpoint, read without torch
    path, torch_logits, torch_onnx = torch_checkpoint(workdir, images)
    state = no.io.load_torch(path)                       # {"state_dict": ...} is unwrapped
    model = nanoopt_cnn()
    model.load_state_dict(state)                         # every missing/unexpected/misshapen key in one error
    model.eval()
    with no.no_grad():
        logits = model(images).data
    accuracy = float((logits.argmax(1) == labels).mean())
    print(f"1. {path}: {len(state)} tensors; nanoopt vs PyTorch: {agreement(logits, torch_logits)}; "
          f"accuracy {100 * accuracy:.2f}%")

    # 2. int8 post-training quantization
    int8 = quant.quantize_static(model, train[0][:256], progress=False)
    int8_accuracy = no.evaluate(int8, test)["accuracy"]
    print(f"2. int8 PTQ: {100 * int8_accuracy:.2f}% ({100 * (int8_accuracy - accuracy):+.2f} points)")

    # 3. out to ONNX, checked in ONNX Runtime
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("3-4. skipped: pip install 'nanoopt[onnx]' to export and import ONNX")
        return
    float_path, int8_path = os.path.join(workdir, "cnn.onnx"), os.path.join(workdir, "cnn_int8.onnx")
    no.onnx.export(model, float_path, images[:1])
    no.onnx.export(int8, int8_path, images[:1])
    floats, ints = no.onnx.compare(model, float_path, images), no.onnx.compare(int8, int8_path, images)
    print(f"3. float ONNX: max |nanoopt - ONNX Runtime| = {floats['max_abs_diff']:.2e} "
          f"({os.path.getsize(float_path):,} bytes)")
    print(f"   int8 QDQ ONNX: argmax agrees on {100 * ints['argmax_agree']:.1f}% of {len(images)} images; "
          f"{ints['differing']} of {ints['elements']} outputs differ, by at most {ints['max_steps']} step "
          f"({os.path.getsize(int8_path):,} bytes)")

    exact_path = os.path.join(workdir, "cnn_int8_integer_ops.onnx")
    no.onnx.export(int8, exact_path, images[:1], quant_format="qoperator")
    exact = no.onnx.compare(int8, exact_path, images)
    print(f"   int8 as integer operators (ConvInteger/MatMulInteger, requantization written out): {exact['differing']} "
          f"of {exact['elements']} outputs differ (bit for bit: {exact['max_abs_diff'] == 0.0})")

    # 4. torch.onnx.export -> no.onnx.load
    imported = no.onnx.load(torch_onnx)
    with no.no_grad():
        again = imported(images).data
    print(f"4. torch.onnx.export -> no.onnx.load: {type(imported).__name__} of {len(list(imported.children()))} "
          f"layers; imported vs PyTorch: {agreement(again, torch_logits)}")


if __name__ == "__main__":
    main()
