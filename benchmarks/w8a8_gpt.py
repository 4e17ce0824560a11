"""W8A8 integer GPT (issue 18, point 2): validation loss against float, and generation speed at batch 1.

A trained character GPT (``examples/chargpt.py`` writes one) is quantized with SmoothQuant (alpha 0.5) and static
int8 activations, per-token dynamic scales, and without SmoothQuant; 128 calibration windows come from the
training split (seed 0), the validation loss is ``evaluate_lm`` on ``validation_windows(val_ids, 64, count)``.
The simulated model is checked against the integer model bit for bit on the validation windows. Generation: one
character prompt, temperature 0, 63 new tokens (inside the 64-token context: the KV cache's regime), batch 1, one
thread, best of ``--repeats``; float is the nanoopt GPT's own fast array path with its KV cache, int8 the W8A8
GPT's fused decode step (one compiled call per token, :mod:`nanoopt.quant.w8a8_decode`).

    python -m benchmarks.w8a8_gpt --checkpoint /path/to/chargpt.npz
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from nanoopt import data, models  # noqa: E402
from nanoopt.quant.smoothquant import smooth_quant  # noqa: E402
from nanoopt.quant.transformer import W8A8Config, convert_w8a8, prepare_w8a8  # noqa: E402
from nanoopt.train_lm import evaluate_lm  # noqa: E402


def tokens_per_second(model, prompt: np.ndarray, new_tokens: int, repeats: int) -> float:
    model.generate(prompt, 4, temperature=0.0)  # warm-up (compilation, packing)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0.0)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--count", type=int, default=240, help="validation windows")
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows from the training split")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model, tokenizer = models.GPT.from_checkpoint_state(no.io.load(args.checkpoint))
    model.eval()
    train_ids = tokenizer.encode(data.load_shakespeare("train"))
    val_ids = tokenizer.encode(data.load_shakespeare("val"))
    block = model.config.block_size
    x_val, y_val = data.validation_windows(val_ids, block_size=block, count=args.count)
    calibration, _ = data.sample_windows(train_ids, block, args.calibration, np.random.default_rng(0))

    float_loss = evaluate_lm(model, x_val, y_val)
    print(f"{'float':<42}val loss {float_loss:.4f}")
    variants = {
        f"W8A8 static, SmoothQuant a={args.alpha}": (args.alpha, W8A8Config()),
        f"W8A8 per-token, SmoothQuant a={args.alpha}": (args.alpha, W8A8Config(per_token=True)),
        "W8A8 static, no SmoothQuant": (None, W8A8Config()),
    }
    integers = {}
    for name, (alpha, config) in variants.items():
        source = model if alpha is None else smooth_quant(model, calibration, alpha=alpha)
        start = time.perf_counter()
        prepared = prepare_w8a8(source, config).calibrate(calibration)
        integer = convert_w8a8(prepared)
        seconds = time.perf_counter() - start
        loss = evaluate_lm(integer, x_val, y_val)
        exact = all(np.array_equal(prepared(x_val[i:i + 32]).data, integer(x_val[i:i + 32]).data)
                    for i in range(0, len(x_val), 32))
        print(f"{name:<42}val loss {loss:.4f}  delta {loss - float_loss:+.4f}  simulated == integer: {exact}  "
              f"(calibrate + convert {seconds:.1f} s)")
        integers[name] = integer

    prompt = tokenizer.encode("\n")[None]
    new_tokens = block - 1
    float_speed = tokens_per_second(model, prompt, new_tokens, args.repeats)
    print(f"generation, batch 1, KV cache, {new_tokens} tokens: float {float_speed:.0f} tok/s")
    for name, integer in integers.items():
        speed = tokens_per_second(integer, prompt, new_tokens, args.repeats)
        print(f"  {name:<40} {speed:.0f} tok/s  ({speed / float_speed:.2f}x float)")


if __name__ == "__main__":
    main()
