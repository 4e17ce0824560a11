"""A character-level GPT on the complete works of Shakespeare, end to end, offline.

    python examples/chargpt.py [--iters 300] [--out chargpt.npz]

1. load the bundled text, build the character tokenizer, split 90% / 10% (files in sorted name order);
2. build nanoGPT's architecture (4 layers, 4 heads, width 128, context 64) and train it with nanoGPT's recipe
   (AdamW, decay on 2-D weights only, warmup + cosine, gradient clipping), printing loss and tokens/s;
3. score a fixed set of validation windows;
4. save the model with its vocabulary, load it back, and generate text with the KV cache (the same tokens as
   without it at temperature 0).

A few hundred steps take minutes and already give word-like text; the 2000 steps of the benchmark
(``python -m benchmarks.chargpt``) reach a validation loss near 1.9.
"""

from __future__ import annotations

import argparse

import nanoopt as no
from nanoopt import data, models
from nanoopt.train_lm import LMTrainConfig, evaluate_lm, train_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--out", default="chargpt.npz")
    args = parser.parse_args()

    text = data.load_shakespeare()
    tokenizer = data.CharTokenizer.from_text(text)  # 84 characters
    train_ids = tokenizer.encode(data.load_shakespeare("train"))
    val_ids = tokenizer.encode(data.load_shakespeare("val"))
    validation = data.validation_windows(val_ids, block_size=64, count=240)

    no.manual_seed(0)
    model = models.gpt(tokenizer.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128)
    print(f"{model.num_parameters():,} parameters; validation loss before training "
          f"{evaluate_lm(model, *validation):.3f}")
    config = LMTrainConfig(max_iters=args.iters, lr_decay_iters=args.iters, warmup_iters=min(100, args.iters // 4))
    history = train_lm(model, train_ids, config, validation=validation)
    print(f"validation loss after {args.iters} steps: {history.val_loss[args.iters]:.3f} "
          f"({history.ms_per_iter:.0f} ms per step)")

    no.io.save(model.checkpoint_state(tokenizer), args.out)
    restored, restored_tokenizer = models.GPT.from_checkpoint_state(no.io.load(args.out))
    prompt = restored_tokenizer.encode("ROMEO.\n")[None]
    greedy = restored.generate(prompt, 200, temperature=0.0)
    assert (greedy == restored.generate(prompt, 200, temperature=0.0, use_cache=False)).all()
    print(restored_tokenizer.decode(restored.generate(prompt, 300, temperature=0.8, top_k=20)[0]))


if __name__ == "__main__":
    main()
