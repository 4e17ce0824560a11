"""Pruning end to end: masks, finetuning, save/load, structural shrinking and sparse inference.

Runs offline in seconds on the bundled 8x8 digits (``--fashion`` uses Fashion-MNIST if it is installed):

    python examples/pruning.py [--fashion]

1. train LeNet-300-100;
2. global magnitude pruning to 90 % (masks: ``weight_orig * weight_mask``), finetune, per-layer report;
3. save the pruned model and load it into a fresh one;
4. remove half the hidden neurons (``ln_structured``), finetune, and ``shrink`` to a physically smaller network;
5. run the 90 % model with CSR sparse kernels.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import nanoopt as no
from nanoopt import data, io, models, prune
from nanoopt.train import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fashion", action="store_true", help="use Fashion-MNIST instead of the bundled digits")
    args = parser.parse_args()
    if args.fashion:
        train, test = data.load_fashion_mnist("train"), data.load_fashion_mnist("test")
        build, epochs, batch_size = models.lenet_300_100, 10, 128
    else:
        train, test = data.load_digits("train"), data.load_digits("test")
        build, epochs, batch_size = (lambda: models.lenet_300_100(in_features=64)), 20, 32

    # 1. a float baseline
    no.manual_seed(0)
    model = build()
    no.fit(model, train, epochs=epochs, lr=0.05, batch_size=batch_size, progress=False)
    print(f"float: {no.evaluate(model, test)['accuracy']:.2%}")

    # 2. global magnitude pruning to 90 %, then three epochs of finetuning (pruned weights stay exactly zero)
    pruned = copy.deepcopy(model)
    weights = prune.prunable_parameters(pruned)
    prune.global_unstructured(weights, amount=0.9)
    print(f"90% pruned, before finetuning: {no.evaluate(pruned, test)['accuracy']:.2%}")
    no.fit(pruned, train, epochs=3, lr=0.01, batch_size=batch_size, progress=False)
    print(f"90% pruned, after 3 epochs:    {no.evaluate(pruned, test)['accuracy']:.2%}")
    print(prune.format_sparsity(prune.sparsity_report(pruned)))

    # 3. the state dict holds weight_orig and weight_mask; a fresh model takes them after the same reparametrisation
    path = os.path.join(tempfile.mkdtemp(), "pruned.npz")
    io.save(pruned, path)
    restored = build()
    prune.load_pruned_state_dict(restored, io.load(path))
    same = (predict(restored, test[0]) == predict(pruned, test[0])).all()
    print(f"saved {sorted(io.describe(path))[:3]}...; reloaded outputs identical: {bool(same)}")

    # 4. structured: half the neurons of both hidden layers, finetune, then build the smaller network
    slim = copy.deepcopy(model)
    for index in (1, 3):
        prune.ln_structured(slim[index], "weight", amount=0.5, n=1, dim=0)
    no.fit(slim, train, epochs=3, lr=0.01, batch_size=batch_size, progress=False)
    report = prune.shrink(slim, test[0][:32])
    prune.remove_all(slim)
    print(report)
    print(f"shrunk: {slim.num_parameters():,} parameters, {no.evaluate(slim, test)['accuracy']:.2%}")

    # 5. inference with sparse kernels: Linear layers become CSR-backed SparseLinear layers
    sparse = copy.deepcopy(pruned)
    print(f"CSR layers: {prune.to_sparse(sparse)}; accuracy {no.evaluate(sparse, test)['accuracy']:.2%}")


if __name__ == "__main__":
    main()
