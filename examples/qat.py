"""Quantization-aware training end to end: train in float, fine-tune through the rounding, convert to integers.

Runs offline in well under a minute on the bundled 8x8 digits (``--fashion`` uses Fashion-MNIST if installed and
takes a few minutes; the measured comparison with 3 seeds is ``python -m benchmarks.qat``):

    python examples/qat.py [--fashion]

1. a small CNN with BatchNorm, trained in float; PTQ (``quant.quantize_static``) as the baseline;
2. int8 QAT: ``quant.prepare_qat`` (BatchNorm folded into the convolutions and trained with the fold simulated),
   a few epochs with ``nanoopt.fit``, BatchNorm then observers frozen by ``QATSchedule``, ``quant.convert`` -- and
   the check that the QAT model's eval-mode simulation equals the integer model bit for bit;
3. 2-bit weights: PTQ against QAT with LSQ's learned steps;
4. 4-bit activations with PACT's learned clipping (W4A4);
5. QAT composed with pruning and distillation: a 60 %-pruned student, fine-tuned under QAT by distilling from
   the float model; its zeros survive into the integer model.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

import nanoopt as no
from nanoopt import data, distill, nn, prune, quant
from nanoopt.quant.observers import PerChannelMSEObserver
from nanoopt.quant.qat import QATSchedule, prepare_qat, qat_config


def small_cnn(size: int) -> nn.Sequential:
    """conv-BN-ReLU-pool twice, then a linear classifier (8x8 or 28x28 single-channel images)."""
    flat = 16 * (size // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),     # (N, 8, S/2, S/2)
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),   # (N, 16, S/4, S/4)
        nn.Flatten(), nn.Linear(flat, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fashion", action="store_true", help="use Fashion-MNIST instead of the bundled digits")
    args = parser.parse_args()
    if args.fashion:
        train_set, test_set, size, epochs, batch = (data.load_fashion_mnist("train"), data.load_fashion_mnist("test"),
                                                    28, 5, 128)
    else:
        train_set, test_set, size, epochs, batch = data.load_digits("train"), data.load_digits("test"), 8, 20, 32
    images = train_set[0]
    steps_per_epoch = -(-len(train_set[1]) // batch)
    calibration = images[:1024]

    def accuracy(model) -> str:
        return f"{no.evaluate(model, test_set)['accuracy']:.2%}"

    def qat(model, epochs=2, **options):
        """prepare_qat -> 2 epochs (BN frozen after half an epoch, observers after one) -> convert."""
        prepared = prepare_qat(model, example_input=images[:1], **options)
        no.fit(prepared, train_set, epochs=epochs, lr=0.01, batch_size=batch, progress=False,
               callbacks=[QATSchedule(freeze_observers_after=steps_per_epoch, freeze_bn_after=steps_per_epoch // 2)])
        return prepared, quant.convert(prepared)

    # 1. the float model, trained for `epochs` + 2 (the QAT models get their last 2 epochs under quantization)
    no.manual_seed(0)
    base = small_cnn(size)
    no.fit(base, train_set, epochs=epochs, lr=0.05, batch_size=batch, progress=False)
    float_model = copy.deepcopy(base)
    no.fit(float_model, train_set, epochs=2, lr=0.01, batch_size=batch, progress=False)
    ptq8 = quant.quantize_static(float_model, calibration, progress=False)
    print(f"float ({epochs + 2} epochs): {accuracy(float_model)}   int8 PTQ: {accuracy(ptq8)}")

    # 2. int8 QAT; eval-mode simulation == integer model, bit for bit
    prepared, int8 = qat(base)
    same = np.array_equal(prepared.eval()(test_set[0]).data, int8(test_set[0]).data)
    print(f"int8 QAT: {accuracy(int8)}   simulation == integer model on the test set: {same}   "
          f"stored bytes {no.report.stored_bytes(float_model):,} -> {no.report.stored_bytes(int8):,}")

    # 3. 2-bit weights ([-2, 1] per output channel): PTQ collapses, LSQ's learned steps recover
    two_bits = quant.QuantSpec(bits=2, symmetric=True, per_channel=True)
    ptq2 = quant.quantize_static(float_model, calibration, quant.QuantConfig(weight=two_bits,
                                                                             weight_observer=PerChannelMSEObserver),
                                 progress=False)
    _, lsq2 = qat(base, config=qat_config(weight=two_bits), weight_quantizer="lsq")
    print(f"W2A8 PTQ: {accuracy(ptq2)}   W2A8 QAT with LSQ: {accuracy(lsq2)}")

    # 4. 4-bit activations after every ReLU with PACT's learned clipping level, 4-bit weights
    config = qat_config(weight=quant.weight_spec(4), activation=quant.QuantSpec(bits=4))
    _, pact = qat(base, config=config, activation_quantizer="pact")
    print(f"W4A4 QAT with PACT: {accuracy(pact)}")

    # 5. prune 60 % of every weight tensor, then QAT by distilling from the float model
    student = copy.deepcopy(base)
    for module in (student[0], student[4], student[9]):
        prune.l1_unstructured(module, "weight", amount=0.6)
    prepared = prepare_qat(student, example_input=images[:1])
    distiller = distill.Distiller(prepared, float_model)
    distiller.fit(train_set, epochs=2, lr=0.01, batch_size=batch, progress=False,
                  callbacks=[QATSchedule(freeze_observers_after=steps_per_epoch, freeze_bn_after=steps_per_epoch)])
    distiller.remove_hooks()
    integer_model = quant.convert(prepared)
    codes = [integer_model.model.get_submodule(name).integer_layer().weight for name in ("0", "4", "9")]
    zeros = sum(int((c == 0).sum()) for c in codes) / sum(c.size for c in codes)
    print(f"60%-pruned, QAT + distillation: {accuracy(integer_model)}   integer weights that are 0: {zeros:.1%}")


if __name__ == "__main__":
    main()
