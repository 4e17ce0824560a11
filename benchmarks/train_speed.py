"""Training speed: images per second for an epoch of LeNet-300-100 and LeNet-5 on Fashion-MNIST (the best of
``--epochs``).

Batch 128, SGD (lr 0.05, momentum 0.9), one thread, in nanoopt and, when ``torch`` is installed, in PyTorch on
the same data in the same run; the ratio is PyTorch's epoch time over nanoopt's (above 1: nanoopt is faster).

    python -m benchmarks.train_speed [--epochs 3] [--avx2-target]

``--avx2-target``: as an AVX2-only machine would run it: Numba compiles for ``benchmarks.common.AVX2_TARGET``,
PyTorch is limited to its AVX2 kernels and CPUID reports no AVX-512 or VNNI to NumPy, OpenBLAS and PyTorch
(``benchmarks.common.mask_cpuid_to_avx2``; the machine line says whether it could).
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from benchmarks.common import AVX2_TARGET_OPTION, pin_environment

    pin_environment(threads=1, avx2_target=AVX2_TARGET_OPTION in sys.argv)

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.common import fashion_mnist, git_revision, machine_description, torch_lenet  # noqa: E402
from nanoopt import data, models  # noqa: E402

BATCH = 128


def nanoopt_epoch_seconds(name: str, images: np.ndarray, labels: np.ndarray, epochs: int) -> tuple[float, float]:
    no.manual_seed(0)
    model = models.lenet_300_100() if name == "LeNet-300-100" else models.lenet5()
    loader = data.DataLoader(images, labels, batch_size=BATCH, shuffle=True, seed=0)
    history = no.fit(model, loader, epochs=epochs, lr=0.05, momentum=0.9, progress=False)
    return min(history.epoch_seconds), history.train_accuracy[-1]


def torch_epoch_seconds(name: str, images: np.ndarray, labels: np.ndarray, epochs: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    model = torch_lenet(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x_all, y_all = torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())
    best = float("inf")
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(labels)))
        start = time.perf_counter()
        for begin in range(0, len(labels), BATCH):
            index = order[begin:begin + BATCH]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_all[index]), y_all[index])
            loss.backward()
            optimizer.step()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per framework; the best epoch is reported")
    parser.add_argument("--avx2-target", action="store_true", help="run as an AVX2-only machine would (see above)")
    args = parser.parse_args()
    images, labels = fashion_mnist("train")
    print(f"## Training speed (seconds per epoch, the best of {args.epochs} per framework; Fashion-MNIST 60k, batch "
          f"{BATCH}, SGD, 1 thread)\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    print("| model | nanoopt s/epoch | nanoopt images/s | PyTorch s/epoch | PyTorch time / nanoopt time |")
    print("|---|---:|---:|---:|---:|")
    for name in ("LeNet-300-100", "LeNet-5"):
        seconds, _ = nanoopt_epoch_seconds(name, images, labels, args.epochs)
        reference = torch_epoch_seconds(name, images, labels, args.epochs)
        torch_text = f"{reference:.2f}" if reference else "torch not installed"
        ratio = f"{reference / seconds:.2f}x" if reference else "-"
        print(f"| {name} | {seconds:.2f} | {len(labels) / seconds:,.0f} | {torch_text} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
