"""Post-training quantization end to end, on the bundled 8x8 digits (offline, under a minute).

    python examples/ptq.py

1. train a small LeNet-5 in float;
2. quantize it to int8 with ``quant.quantize_static`` (BatchNorm folding, ReLU fusion, calibration, conversion)
   and compare accuracy, stored size and speed;
3. check the promise: the prepared (simulated) model in eval mode equals the integer model bit for bit;
4. other precisions: 16-bit activations, 4-bit weights (round to nearest, then AdaRound), dynamic and
   weight-only quantization;
5. look inside: per-layer SQNR, one-layer-at-a-time sensitivity, saturation, integer-in/integer-out execution,
   and saving/loading the integer model.
"""

import os
import tempfile
import time

import numpy as np

import nanoopt as no
from nanoopt import data, models, quant
from nanoopt.tensor import Tensor, no_grad


def accuracy(model, test):
    return 100 * no.evaluate(model, test)["accuracy"]


def milliseconds(model, images):
    with no_grad():
        model(Tensor(images))
        start = time.perf_counter()
        for _ in range(20):
            model(Tensor(images))
    return (time.perf_counter() - start) / 20 * 1e3


def main() -> None:
    no.manual_seed(0)
    train, test = data.load_digits("train"), data.load_digits("test")

    # 1. a float model
    model = models.lenet5(input_size=8)
    no.fit(model, train, epochs=15, lr=0.05, progress=False)
    model.eval()
    print(f"float LeNet-5: {accuracy(model, test):.2f}%  ({no.report.stored_bytes(model):,} bytes stored)")

    # 2. int8 post-training quantization: 256 training images calibrate the activation ranges
    calibration = train[0][:256]
    qmodel = quant.quantize_static(model, calibration, progress=False)
    quant.tune_backends(qmodel, test[0][:256])  # optional: the fastest kernel backend per layer (same integers)
    print(f"int8 LeNet-5:  {accuracy(qmodel, test):.2f}%  ({no.report.stored_bytes(qmodel):,} bytes stored)")
    print(f"  latency, batch 256: float {milliseconds(model, test[0][:256]):.2f} ms, "
          f"int8 {milliseconds(qmodel, test[0][:256]):.2f} ms")

    # 3. the same thing step by step, and the promise: simulation == integer model, bit for bit
    prepared = quant.prepare(model, quant.QuantConfig(), example_input=calibration[:1])
    quant.calibrate(prepared, calibration, progress=False)
    integer_model = quant.convert(prepared)
    probe = np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32) * 3  # any input at all
    same = np.array_equal(prepared(Tensor(probe)).data, integer_model(Tensor(probe)).data)
    print(f"prepared model in eval mode == converted integer model, bit for bit: {same}")

    # 4. other precisions
    int16 = quant.quantize_static(model, calibration, quant.QuantConfig.int16_activations(), progress=False)
    print(f"int16 activations / int8 weights: {accuracy(int16, test):.2f}%")
    w4 = quant.calibrate(quant.prepare(model, quant.QuantConfig.weights4(), calibration[:1]), calibration,
                         progress=False)
    print(f"4-bit weights, round to nearest: {accuracy(quant.convert(w4), test):.2f}%", end="")
    quant.adaround(w4, calibration, iterations=300, progress=False)
    w4_model = quant.convert(w4)
    print(f"; with AdaRound: {accuracy(w4_model, test):.2f}%  ({no.report.stored_bytes(w4_model):,} bytes stored)")
    dynamic = quant.quantize_dynamic(model)
    weights_only = quant.quantize_weights(model, bits=4, group_size=16)
    print(f"dynamic int8 (linear layers): {accuracy(dynamic, test):.2f}%; 4-bit weight-only, groups of 16: "
          f"{accuracy(weights_only, test):.2f}% ({no.report.stored_bytes(weights_only):,} bytes stored)")

    # 5. look inside
    sqnr = quant.sqnr_per_layer(prepared, calibration)
    print("per-layer SQNR (dB):", {name: round(value, 1) for name, value in sqnr.items()})
    sensitivity = quant.layer_sensitivity(prepared, test[0], test[1])
    print("accuracy with one layer quantized at a time:",
          {name: round(100 * result["accuracy"], 1) for name, result in sensitivity.items()})
    saturation = quant.saturation_counts(prepared, calibration)
    print("saturated codes per layer output:",
          {name: f"{100 * entry['saturated']:.2f}%" for name, entry in saturation.items() if "saturated" in entry})
    codes = integer_model.quantize_input(test[0][:4])  # int8 in ...
    logits = integer_model.forward_int(codes)  # ... int8 out
    print(f"integer in / integer out: {codes.dtype} {codes.shape} -> {logits.dtype} {logits.shape}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "lenet5_int8.npz")
        no.io.save(integer_model, path)
        again = quant.convert(prepared)  # same structure; load the saved integers into it
        again.load_state_dict(no.io.load(path))
        print(f"saved {os.path.getsize(path):,} bytes; reloaded model identical: "
              f"{np.array_equal(again(test[0]).data, integer_model(test[0]).data)}")


if __name__ == "__main__":
    main()
