"""Compressing the character-level GPT: every one-shot method of issue 18 on the same trained weights, one table.

Protocol (every number measured in this run):

* model: the GPT of ``benchmarks/chargpt.py`` (4 layers, 4 heads, width 128, context 64) trained for ``--iters``
  steps with nanoGPT's recipe at seed 0, or loaded from ``--checkpoint`` when that file exists (it is written
  there after training, so a second run skips the training);
* calibration: 128 training windows of 64 characters (``data.sample_windows`` at seed 0), in batches of 16,
  the same for every method;
* every Linear of the blocks is compressed; the head (tied to the token embedding) stays in float;
* validation loss: the fixed 1,200 validation windows of ``benchmarks/chargpt.py`` (the last 10% of the text);
* stored bytes: the size of the file ``nanoopt.io.save`` writes for the compressed model (pruned models with
  their masks made permanent, so stored dense);
* generation: batch 1, temperature 0, 63 new tokens after a one-character prompt, with the KV cache; the fastest
  of 5 runs, each interleaved with a run of the float model, whose fastest gives the row's "x float" (so that a
  passing disturbance of the machine slows both sides of the ratio);
* "(N:M kernel)" rows: the 2:4 model with its pruned Linear layers swapped for sparse ones
  (``prune.to_sparse(format="nm")``), which store the kept values and their offsets and run the slot-major N:M
  kernel of ``nanoopt.kernels.nm_sparse``; the other pruned rows are stored and run dense;
* PyTorch's dynamic int8 quantization (``torch.ao.quantization.quantize_dynamic`` of every Linear) of the same
  trained weights, where torch is installed, against PyTorch's float model of the same weights.

    python -m benchmarks.compress_gpt [--iters 2000] [--checkpoint ~/.cache/nanoopt/chargpt-2000-seed0.npz]
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import copy  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.chargpt import SIZES, prepare  # noqa: E402
from benchmarks.common import generation_speed, generation_speeds, git_revision, machine_description  # noqa: E402
from nanoopt import data, models, nn, prune, quant  # noqa: E402
from nanoopt.train_lm import LMTrainConfig, evaluate_lm, train_lm  # noqa: E402

CALIBRATION_WINDOWS, CALIBRATION_BATCH = 128, 16
KEEP_FLOAT = ["lm_head"]


def trained_gpt(tokenizer: data.CharTokenizer, train_ids: np.ndarray, iters: int, path: Path) -> models.GPT:
    if path.exists():
        model, _ = models.GPT.from_checkpoint_state(no.io.load(str(path)))
        return model
    no.manual_seed(0)
    model = models.gpt(tokenizer.vocab_size, **SIZES)
    config = LMTrainConfig(max_iters=iters, lr_decay_iters=iters, warmup_iters=min(100, iters // 2), seed=0)
    train_lm(model, train_ids, config, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    no.io.save(model.checkpoint_state(tokenizer), str(path))
    return model


def calibration_batches(train_ids: np.ndarray) -> list[np.ndarray]:
    x, _ = data.sample_windows(train_ids, SIZES["block_size"], CALIBRATION_WINDOWS, np.random.default_rng(0))
    return [x[i:i + CALIBRATION_BATCH] for i in range(0, CALIBRATION_WINDOWS, CALIBRATION_BATCH)]


def pruned(method: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Run a pruning method (on a copy: pruning works in place, as PyTorch's) and make its masks permanent (the
    model is then stored dense)."""
    def run() -> nn.Module:
        model = method()
        prune.remove_all(model)
        return model
    return run


def nm_kernel(method: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A 2:4-pruned model whose pruned Linear layers are swapped for sparse ones (``prune.to_sparse``, N:M format:
    values and 2-bit-range offsets stored, the slot-major N:M kernel at run time, in the GPT's array fast path too)."""
    def run() -> nn.Module:
        model = method()
        prune.to_sparse(model, format="nm", n=2, m=4)
        return model
    return run


def magnitude(gpt: models.GPT, nm: bool) -> nn.Module:
    model = copy.deepcopy(gpt)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in KEEP_FLOAT:
            if nm:
                prune.nm_sparsity(module, "weight", n=2, m=4)
            else:
                prune.l1_unstructured(module, "weight", amount=0.5)
    return model


def methods(gpt: models.GPT, calibration: list[np.ndarray]) -> list[tuple[str, Callable[[], nn.Module]]]:
    common = dict(ignore=KEEP_FLOAT)
    rows: list[tuple[str, Callable[[], nn.Module]]] = []
    for bits, group in ((4, 128), (3, 128), (2, 32)):
        rows.append((f"RTN W{bits} g{group} symmetric",
                     lambda b=bits, g=group: quant.rtn(gpt, bits=b, group_size=g, symmetric=True, **common)))
        rows.append((f"GPTQ W{bits} g{group} symmetric",
                     lambda b=bits, g=group: quant.gptq(gpt, calibration, bits=b, group_size=g, symmetric=True,
                                                        **common)))
        rows.append((f"GPTQ W{bits} g{group}",
                     lambda b=bits, g=group: quant.gptq(gpt, calibration, bits=b, group_size=g, **common)))
    rows += [
        ("GPTQ W3 g128 act-order", lambda: quant.gptq(gpt, calibration, bits=3, group_size=128, act_order=True,
                                                      **common)),
        ("AWQ W3 g128", lambda: quant.awq(gpt, calibration, bits=3, group_size=128, **common)),
        ("AWQ + GPTQ W3 g128", lambda: quant.awq(gpt, calibration, bits=3, group_size=128, rounding="gptq",
                                                 **common)),
        ("magnitude 50%", pruned(lambda: magnitude(gpt, nm=False))),
        ("Wanda 50%", pruned(lambda: prune.wanda(copy.deepcopy(gpt), calibration, sparsity=0.5, **common))),
        ("SparseGPT 50%", pruned(lambda: prune.sparsegpt(copy.deepcopy(gpt), calibration, sparsity=0.5, **common))),
        ("magnitude 2:4", pruned(lambda: magnitude(gpt, nm=True))),
        ("Wanda 2:4", pruned(lambda: prune.wanda(copy.deepcopy(gpt), calibration, n=2, m=4, **common))),
        ("SparseGPT 2:4", pruned(lambda: prune.sparsegpt(copy.deepcopy(gpt), calibration, n=2, m=4, **common))),
        ("magnitude 2:4 (N:M kernel)", nm_kernel(pruned(lambda: magnitude(gpt, nm=True)))),
        ("SparseGPT 2:4 (N:M kernel)", nm_kernel(pruned(lambda: prune.sparsegpt(copy.deepcopy(gpt), calibration, n=2,
                                                                                 m=4, **common)))),
    ]
    return rows


def stored_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.npz")
        no.io.save(model, path)
        return os.path.getsize(path)


def torch_dynamic_int8(gpt: models.GPT, validation: tuple[np.ndarray, np.ndarray]) -> tuple[float, float] | None:
    """PyTorch's float and dynamic-int8 validation loss of the same weights, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from benchmarks.torch_gpt import TorchGPT

    torch.set_num_threads(1)
    model = TorchGPT(gpt.config.vocab_size, SIZES["block_size"], SIZES["n_layer"], SIZES["n_head"], SIZES["n_embd"])
    model.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in gpt.state_dict().items()},
                          strict=False)
    model.eval()
    int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def loss(net: torch.nn.Module) -> float:
        x, y = validation
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(x), 64):
                logits = net(torch.from_numpy(x[start:start + 64]))
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y[start:start + 64]).reshape(-1),
                    reduction="sum"))
        return total / y.size

    return loss(model), loss(int8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--checkpoint", type=Path,
                        default=Path.home() / ".cache" / "nanoopt" / "chargpt-2000-seed0.npz")
    args = parser.parse_args()
    tokenizer, train_ids, _, validation = prepare()
    gpt = trained_gpt(tokenizer, train_ids, args.iters, args.checkpoint).eval()
    calibration = calibration_batches(train_ids)
    prompt = tokenizer.encode("\n")[None]
    float_loss = evaluate_lm(gpt, *validation)
    float_bytes, float_speed = stored_bytes(gpt), generation_speed(gpt, prompt)
    print(f"## Compressing the character-level GPT ({args.iters} training steps, seed 0, 1 thread)\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    print(f"Model {SIZES}; {CALIBRATION_WINDOWS} calibration windows from the training split; the head (tied to "
          f"the embedding) in float; validation loss on {len(validation[0]):,} fixed windows; generation at batch "
          "1 with the KV cache, 63 new tokens (fastest of 5 runs; \"x float\" against the float model's runs "
          "interleaved with the row's). Pruned rows are stored and run dense, except \"(N:M kernel)\" rows: sparse "
          "layers (values and offsets) on the N:M kernel.\n")
    print("| method | val loss | delta vs float | stored bytes | x smaller | gen tok/s | x float | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| float32 | {float_loss:.4f} | - | {float_bytes:,} | 1.00x | {float_speed:,.0f} | 1.00x | - |",
          flush=True)
    for name, method in methods(gpt, calibration):
        start = time.perf_counter()
        model = method().eval()
        seconds = time.perf_counter() - start
        loss, size = evaluate_lm(model, *validation), stored_bytes(model)
        speed, float_now = generation_speeds([model, gpt], prompt)  # float interleaved: a robust ratio
        print(f"| {name} | {loss:.4f} | {loss - float_loss:+.4f} | {size:,} | {float_bytes / size:.2f}x | "
              f"{speed:,.0f} | {speed / float_now:.2f}x | {seconds:.1f} |", flush=True)
    reference = torch_dynamic_int8(gpt, validation)
    if reference is None:
        print("| PyTorch dynamic int8 | torch not installed | | | | | | |")
    else:
        print(f"| PyTorch float32 (same weights) | {reference[0]:.4f} | {reference[0] - float_loss:+.4f} | | | | "
              "| |")
        print(f"| PyTorch dynamic int8 | {reference[1]:.4f} | {reference[1] - reference[0]:+.4f} (vs PyTorch "
              "float) | | | | | |")


if __name__ == "__main__":
    main()
