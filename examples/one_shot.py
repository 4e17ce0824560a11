"""One-shot compression from a few calibration batches, no finetuning: GPTQ, AWQ, Wanda and SparseGPT.

These are the methods used on large language models; here they run on any model made of ``nn.Linear`` layers
(the bundled 8x8 digits and LeNet-300-100, offline, in seconds):

    python examples/one_shot.py

1. train the float model; take 512 training images as calibration data;
2. 3-bit weights: round to nearest, GPTQ, AWQ, AWQ followed by GPTQ (per-row grids: 300 and 100 have no common
   group size with 64);
3. 50 % sparsity with Wanda and SparseGPT, 2:4 with SparseGPT; then the 2:4 model quantized by GPTQ, which keeps
   its zeros (a sparse 3-bit model), and the sparse model run on the N:M kernels.
"""

from __future__ import annotations

import copy

import nanoopt as no
from nanoopt import data, models, prune, quant


def main() -> None:
    no.manual_seed(0)
    train, test = data.load_digits("train"), data.load_digits("test")
    model = models.lenet_300_100(in_features=64)
    no.fit(model, train, epochs=20, lr=0.05, momentum=0.9, batch_size=128, progress=False)
    calibration = [train[0][start:start + 128] for start in range(0, 512, 128)]

    def show(label: str, compressed: no.nn.Module, size: bool = True) -> None:
        scores = no.evaluate(compressed, test)
        stored = f"{no.report.stored_bytes(compressed):>9,d} bytes" if size else ""
        print(f"{label:28s} accuracy {100 * scores['accuracy']:6.2f} %   loss {scores['loss']:.4f}   {stored}")

    show("float", model)
    show("W3 round to nearest", quant.rtn(model, bits=3, group_size=None))
    show("W3 GPTQ", quant.gptq(model, calibration, bits=3, group_size=None))
    show("W3 AWQ", quant.awq(model, calibration, bits=3, group_size=None))
    show("W3 AWQ + GPTQ", quant.awq(model, calibration, bits=3, group_size=None, rounding="gptq"))
    show("50 % Wanda", prune.wanda(copy.deepcopy(model), calibration, sparsity=0.5))
    show("50 % SparseGPT", prune.sparsegpt(copy.deepcopy(model), calibration, sparsity=0.5))
    sparse = prune.sparsegpt(copy.deepcopy(model), calibration, n=2, m=4)
    show("2:4 SparseGPT", sparse)
    show("2:4 SparseGPT, then W3 GPTQ", quant.gptq(sparse, calibration, bits=3, group_size=None))
    kernels = prune.remove_all(copy.deepcopy(sparse))
    prune.to_sparse(kernels, format="nm")  # in place: each Linear becomes a SparseLinear (values + 2-bit indices)
    show("2:4 SparseGPT on N:M kernels", kernels, size=False)  # stored_bytes does not see SparseLinear's arrays


if __name__ == "__main__":
    main()
