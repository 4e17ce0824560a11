"""Where the time of a slid-window GPT step goes, and how fast it would have to be for issue 17's 2x target.

Issue 17 asks generation with the cache (batch 1, 256 new tokens after a one-token prompt) to reach twice the
tokens/s of PyTorch's cache-less nanoGPT ``generate``. Positions are absolute, so after 64 tokens every step
recomputes the whole 64-token window (:meth:`nanoopt.models_gpt.GPT._array_logits`, the last block only for the
last position). This script times, in one process and one thread, with the chargpt config (n_layer 4, n_head 4,
n_embd 128, block 64):

* PyTorch's forward (``last_only``, as its ``generate`` calls it) for every context length T = 1..64, so that its
  256-token generation costs ``sum_i torch(min(i + 1, 64))``;
* nanoopt's cached steps for the first 63 tokens and its window recompute;
* the same matrix products by BLAS alone: only the products the window recompute performs, by NumPy's BLAS on
  contiguous ``W^T`` operands (as ``GPT._array_plan`` stores them). Where the register tiles of
  ``nanoopt.kernels.float_gemm_avx2`` are available the window computes most of these products on them instead, so
  the window may take less than this reference plus its other work;

and prints the window time the 2x target requires, ``(sum torch / 2 - cached part) / 193``.
Times are the best of 5 rounds (``benchmarks.common.best_seconds_interleaved``): in each round every measurement in
turn is called repeatedly for 50 ms (warm caches, as when generation calls it token after token), so that a change
in the machine's speed weighs on all of them alike.

    python -m benchmarks.gpt_window [--avx2-target]   # the option: as on an AVX2-only CPU (CPUID masked)
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from benchmarks.common import AVX2_TARGET_OPTION, pin_environment

    pin_environment(threads=1, avx2_target=AVX2_TARGET_OPTION in sys.argv)  # --avx2-target: as on an AVX2-only CPU

from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.common import best_seconds_interleaved, machine_description  # noqa: E402
from nanoopt import models  # noqa: E402

SIZES = dict(vocab_size=84, block_size=64, n_layer=4, n_head=4, n_embd=128)
NEW_TOKENS = 256


def blas_floor(model: models.GPT) -> Callable[[], None]:
    """The matrix products of one 64-token window recompute, on the model's arrays, and nothing else."""
    block = model.config.block_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((block, model.config.n_embd)).astype(np.float32)
    blocks = list(model.transformer["h"])
    h, d = blocks[0].attn.n_head, blocks[0].attn.head_dim
    q = rng.standard_normal((h, block, d)).astype(np.float32)
    p = rng.standard_normal((h, block, block)).astype(np.float32)
    hidden = rng.standard_normal((block, blocks[0].mlp.c_fc.weight.shape[0])).astype(np.float32)

    # the operands in the layout the window recompute uses: W^T stored contiguous (GPT._array_plan)
    products = []
    last = len(blocks) - 1
    for i, b in enumerate(blocks):
        c = b.attn.inner_dim
        w_qkv = np.ascontiguousarray(b.attn.c_attn.weight.data.T)
        products.append((w_qkv if i < last else w_qkv[:, c:], np.ascontiguousarray(b.attn.c_proj.weight.data.T),
                         np.ascontiguousarray(b.mlp.c_fc.weight.data.T),
                         np.ascontiguousarray(b.mlp.c_proj.weight.data.T), w_qkv[:, :c]))
    head_t = np.ascontiguousarray(model.lm_head.weight.data.T)

    def run_products() -> None:
        for i, (w_qkv, w_proj, w_fc, w_out, w_q) in enumerate(products):
            rows = slice(None) if i < last else slice(-1, None)
            np.matmul(x, w_qkv)
            if i == last:
                np.matmul(x[rows], w_q)
            np.matmul(q[:, rows], np.swapaxes(q, -1, -2))
            np.matmul(p[:, rows], q)
            np.matmul(x[rows], w_proj)
            np.matmul(x[rows], w_fc)
            np.matmul(hidden[rows], w_out)
        np.matmul(x[-1:], head_t)

    return run_products


def main() -> None:
    import torch

    from benchmarks.torch_gpt import TorchGPT

    torch.set_num_threads(1)
    no.manual_seed(0)
    model = models.gpt(**SIZES).eval()
    theirs = TorchGPT(**SIZES).eval()
    block = SIZES["block_size"]
    ids = np.random.default_rng(1).integers(0, SIZES["vocab_size"], size=(1, block))
    plan = model._array_plan()  # gathered once per generation, as generate does
    prompt = ids[:, :1]
    with torch.no_grad():
        seconds = best_seconds_interleaved(
            [lambda t=t: theirs(torch.from_numpy(ids[:, :t]), last_only=True) for t in range(1, block + 1)]
            + [lambda: model._array_logits(ids, None, plan), blas_floor(model),
               lambda: model.generate(prompt, block - 1, temperature=0.0)], min_time=0.05)  # last: 63 cached steps
        *torch_t, window, floor, cached = (1e3 * value for value in seconds)  # ms
    torch_total = sum(torch_t[min(i, block - 1)] for i in range(NEW_TOKENS))
    slid = NEW_TOKENS - (block - 1)
    ours = cached + slid * window
    needed = (torch_total / 2 - cached) / slid
    print(f"## GPT window recompute against PyTorch (1 thread)\n\n{machine_description()}\n")
    print("| quantity | ms |\n|---|---:|")
    print(f"| PyTorch forward, T = 1 / 64 | {torch_t[0]:.3f} / {torch_t[-1]:.3f} |")
    print(f"| PyTorch generate, {NEW_TOKENS} tokens (sum over T) | {torch_total:.1f} |")
    print(f"| nanoopt: {block - 1} cached steps | {cached:.1f} |")
    print(f"| nanoopt: one {block}-token window recompute | {window:.3f} |")
    print(f"| that window's matrix products by BLAS alone | {floor:.3f} |")
    print(f"| window time needed for 2x | {needed:.3f} |")
    print(f"\n- estimated ratio: {torch_total / ours:.2f}x (target 2x); the window is {window / torch_t[-1]:.2f} of "
          f"PyTorch's 64-token forward and needs to be at most {needed / torch_t[-1]:.2f} of it; its products by "
          f"BLAS alone would take {floor / torch_t[-1]:.2f} of it.")


if __name__ == "__main__":
    main()
