"""Character-level GPT on Shakespeare: nanoopt against PyTorch, same architecture, data and batches, same run.

The config of issue 17: n_layer 4, n_head 4, n_embd 128, block 64, batch 12, dropout 0, AdamW (lr 1e-3, betas
(0.9, 0.99), weight decay 0.1 on 2-D weights), 100 warmup steps, cosine to 1e-4 at the last step, clip 1.0. Both
frameworks start from the same initial weights (nanoopt's nanoGPT initialisation, copied into the PyTorch model)
and see the same windows (one seeded sampler per seed). Reported per seed: validation loss on a fixed set of
1,200 validation windows (the last 10% of the text), median ms per training step, and generation speed at
batch 1 (256 new tokens after a one-character prompt, temperature 0): nanoopt with and without its KV cache,
PyTorch with nanoGPT's cache-less ``generate``. One thread.

    python -m benchmarks.chargpt                  # 2000 steps, seeds 0 and 1 (long)
    python -m benchmarks.chargpt --iters 20       # the speed comparison only (validation after 20 steps)
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.common import git_revision, machine_description  # noqa: E402
from nanoopt import data, models  # noqa: E402
from nanoopt.train_lm import LMTrainConfig, lr_schedule, train_lm  # noqa: E402

SIZES = dict(block_size=64, n_layer=4, n_head=4, n_embd=128)
VALIDATION_WINDOWS = 1200


def prepare() -> tuple[data.CharTokenizer, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    text = data.load_shakespeare()
    tokenizer = data.CharTokenizer.from_text(text)
    train_ids = tokenizer.encode(data.load_shakespeare("train"))
    val_ids = tokenizer.encode(data.load_shakespeare("val"))
    validation = data.validation_windows(val_ids, SIZES["block_size"], count=VALIDATION_WINDOWS)
    return tokenizer, train_ids, val_ids, validation


def generation_tokens_per_second(generate, new_tokens: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    tokens = generate(new_tokens)
    return new_tokens / (time.perf_counter() - start), np.asarray(tokens)


def run_nanoopt(seed: int, vocab: int, train_ids: np.ndarray, validation, config: LMTrainConfig, prompt: np.ndarray,
                new_tokens: int) -> dict:
    no.manual_seed(seed)
    model = models.gpt(vocab_size=vocab, **SIZES)
    initial = {k: v.copy() for k, v in model.state_dict().items()}
    history = train_lm(model, train_ids, config, validation=validation, progress=False)
    cached_tps, cached = generation_tokens_per_second(
        lambda n: model.generate(prompt, n, temperature=0.0), new_tokens)
    plain_tps, plain = generation_tokens_per_second(
        lambda n: model.generate(prompt, n, temperature=0.0, use_cache=False), new_tokens)
    return dict(initial=initial, val=history.val_loss[config.max_iters], ms=history.ms_per_iter,
                cached_tps=cached_tps, plain_tps=plain_tps, tokens=cached, same=bool(np.array_equal(cached, plain)))


def run_torch(initial: dict, vocab: int, train_ids: np.ndarray, validation, config: LMTrainConfig,
              prompt: np.ndarray, new_tokens: int) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    from benchmarks.torch_gpt import TorchGPT

    torch.set_num_threads(1)
    model = TorchGPT(vocab_size=vocab, **SIZES)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in initial.items()})
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas)
    rng = np.random.default_rng(config.seed)
    seconds = []
    model.train()
    for iteration in range(config.max_iters):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(iteration, config)
        x, y = data.sample_windows(train_ids, SIZES["block_size"], config.batch_size, rng)
        logits = model(torch.from_numpy(x))
        loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), torch.from_numpy(y).reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    model.eval()
    total = 0.0
    with torch.no_grad():
        vx, vy = validation
        for begin in range(0, len(vx), 64):
            xb, yb = torch.from_numpy(vx[begin:begin + 64]), torch.from_numpy(vy[begin:begin + 64])
            total += float(torch.nn.functional.cross_entropy(model(xb).view(-1, vocab), yb.reshape(-1))) * len(xb)
    tps, tokens = generation_tokens_per_second(
        lambda n: model.generate(torch.from_numpy(prompt), n, temperature=0.0).numpy(), new_tokens)
    return dict(val=total / len(vx), ms=1000 * float(np.median(seconds)), tps=tps, tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2000, help="training steps (the cosine ends at the last one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated at batch 1")
    args = parser.parse_args()
    tokenizer, train_ids, _, validation = prepare()
    vocab = tokenizer.vocab_size
    config = LMTrainConfig(max_iters=args.iters, lr_decay_iters=args.iters, warmup_iters=min(100, args.iters // 2))
    prompt = tokenizer.encode("\n")[None]
    print(f"## Character-level GPT on Shakespeare ({args.iters} steps, 1 thread)\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    print(f"Data: {len(train_ids):,} training / {len(validation[0]) * SIZES['block_size']:,} validation tokens "
          f"(fixed windows), vocabulary {vocab}. Model: {SIZES}, batch {config.batch_size}.\n")
    print("| seed | framework | val loss | ms / step | generate tok/s (cache) | generate tok/s (no cache) |")
    print("|---|---|---:|---:|---:|---:|")
    ratios, speedups = [], []
    for seed in args.seeds:
        config.seed = seed
        ours = run_nanoopt(seed, vocab, train_ids, validation, config, prompt, args.new_tokens)
        print(f"| {seed} | nanoopt | {ours['val']:.4f} | {ours['ms']:.1f} | {ours['cached_tps']:,.0f} | "
              f"{ours['plain_tps']:,.0f} |", flush=True)
        theirs = run_torch(ours["initial"], vocab, train_ids, validation, config, prompt, args.new_tokens)
        if theirs is None:
            print(f"| {seed} | PyTorch | torch not installed | | | |")
            continue
        print(f"| {seed} | PyTorch | {theirs['val']:.4f} | {theirs['ms']:.1f} | - | {theirs['tps']:,.0f} |",
              flush=True)
        ratios.append(ours["ms"] / theirs["ms"])
        speedups.append(ours["cached_tps"] / theirs["tps"])
        print(f"| {seed} | nanoopt - PyTorch | {ours['val'] - theirs['val']:+.4f} | x{ratios[-1]:.2f} | "
              f"x{speedups[-1]:.2f} vs PyTorch | cache = no cache: {ours['same']} |", flush=True)
    if ratios:
        print(f"\nnanoopt step time / PyTorch step time: {', '.join(f'{r:.2f}' for r in ratios)}; nanoopt cached "
              f"generation / PyTorch cache-less generation: {', '.join(f'{s:.2f}' for s in speedups)}.")
    print("\nSample (nanoopt, last seed, temperature 0):\n")
    print("```\n" + tokenizer.decode(ours["tokens"][0]).strip() + "\n```")


if __name__ == "__main__":
    main()
