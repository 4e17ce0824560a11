"""W8A8 integer GPT (issue 18, point 2): validation loss against float, and generation speed at batch 1.

The trained character GPT of ``benchmarks/compress_gpt.py`` (2000 steps, seed 0; cached) is quantized with
SmoothQuant (alpha 0.5) and static int8 activations, per-token dynamic scales, without SmoothQuant, and with
I-BERT's integer-only softmax, GELU and LayerNorm (``W8A8Config(nonlinear="ibert")``, Kim et al. 2021); 128
calibration windows come from the training split (seed 0), the validation loss is ``evaluate_lm`` on the 1,200
validation windows of ``benchmarks/chargpt.py``. The simulated model is checked against the integer model bit for
bit on the validation windows. Generation: one character prompt, temperature 0, 63 new tokens (inside the 64-token
context: the KV cache's regime), batch 1, one thread, best of ``--repeats``, interleaved with the float model's
runs; float is the nanoopt GPT's own fast array path with its KV cache, int8 the W8A8 GPT's fused decode step
(one compiled call per token, :mod:`nanoopt.quant.w8a8_decode`).

    python -m benchmarks.w8a8_gpt            # the GPT of benchmarks/compress_gpt.py (trained once, cached)
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.chargpt import prepare  # noqa: E402
from benchmarks.common import generation_speeds, git_revision, machine_description  # noqa: E402
from benchmarks.compress_gpt import trained_gpt  # noqa: E402
from nanoopt import data  # noqa: E402
from nanoopt.quant.smoothquant import smooth_quant  # noqa: E402
from nanoopt.quant.transformer import W8A8Config, convert_w8a8, prepare_w8a8  # noqa: E402
from nanoopt.train_lm import evaluate_lm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000, help="training steps, if the checkpoint is not there")
    parser.add_argument("--checkpoint", type=Path,
                        default=Path.home() / ".cache" / "nanoopt" / "chargpt-2000-seed0.npz",
                        help="the trained GPT (benchmarks/compress_gpt.py's; trained and saved there if absent)")
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows from the training split")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tokenizer, train_ids, _, (x_val, y_val) = prepare()
    model = trained_gpt(tokenizer, train_ids, args.iters, args.checkpoint).eval()
    block = model.config.block_size
    calibration, _ = data.sample_windows(train_ids, block, args.calibration, np.random.default_rng(0))
    prompt = tokenizer.encode("\n")[None]
    new_tokens = block - 1

    float_loss = evaluate_lm(model, x_val, y_val)
    print(f"## W8A8 integer GPT ({args.iters} training steps, seed 0, 1 thread)\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    print(f"{args.calibration} calibration windows from the training split; validation loss on {len(x_val):,} fixed "
          f"windows; \"simulated == integer\": the prepared model's logits equal the converted integer model's on "
          f"every validation window; generation at batch 1 with the KV cache, {new_tokens} new tokens, fastest of "
          f"{args.repeats} runs, interleaved with the float model's runs (\"x float\").\n")
    print("| model | val loss | delta vs float | simulated == integer | calibrate + convert (s) | gen tok/s "
          "| x float |")
    print("|---|---:|---:|---|---:|---:|---:|")
    variants = {
        f"W8A8 static, SmoothQuant {args.alpha}": (args.alpha, W8A8Config()),
        f"W8A8 per-token, SmoothQuant {args.alpha}": (args.alpha, W8A8Config(per_token=True)),
        "W8A8 static, no SmoothQuant": (None, W8A8Config()),
        f"W8A8 I-BERT integer-only, SmoothQuant {args.alpha}": (args.alpha, W8A8Config(nonlinear="ibert")),
    }
    float_printed = False
    for name, (alpha, config) in variants.items():
        source = model if alpha is None else smooth_quant(model, calibration, alpha=alpha)
        start = time.perf_counter()
        prepared = prepare_w8a8(source, config).calibrate(calibration)
        integer = convert_w8a8(prepared)
        seconds = time.perf_counter() - start
        loss = evaluate_lm(integer, x_val, y_val)
        exact = all(np.array_equal(prepared(x_val[i:i + 32]).data, integer(x_val[i:i + 32]).data)
                    for i in range(0, len(x_val), 32))
        speed, float_speed = generation_speeds([integer, model], prompt, new_tokens, args.repeats)
        if not float_printed:
            print(f"| float32 | {float_loss:.4f} | - | - | - | {float_speed:,.0f} | 1.00x |")
            float_printed = True
        print(f"| {name} | {loss:.4f} | {loss - float_loss:+.4f} | {exact} | {seconds:.1f} | {speed:,.0f} | "
              f"{speed / float_speed:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
