"""Character-level GPT on Shakespeare: nanoopt against PyTorch, same architecture, data and batches, same run.

The config of issue 17: n_layer 4, n_head 4, n_embd 128, block 64, batch 12, dropout 0, AdamW (lr 1e-3, betas
(0.9, 0.99), weight decay 0.1 on 2-D weights), 100 warmup steps, cosine to 1e-4 at the last step, clip 1.0. Both
frameworks start from the same initial weights (nanoopt's nanoGPT initialisation, copied into the PyTorch model)
and see the same windows (one seeded sampler per seed); their steps alternate, so that the load of the machine
weighs on both alike. Reported per seed: validation loss on a fixed set of 1,200 validation windows (the last
10% of the text), median ms per training step, and generation speed at batch 1 after a one-character prompt
(the fastest of five timed runs, taken in turns with the other framework's, for every framework alike),
temperature 0, for 63 new tokens (they fit the 64-token context: the KV cache's regime) and 256 (the window
slides: every position changes at every step, so the cache is rebuilt each step, as the cache-less path
computes everything): nanoopt with and without its KV cache, PyTorch with nanoGPT's cache-less ``generate``.
One thread.

    python -m benchmarks.chargpt                  # 2000 steps, seeds 0 and 1 (long)
    python -m benchmarks.chargpt --iters 20       # the speed comparison only (validation after 20 steps)
    python -m benchmarks.chargpt --avx2-target    # as on an AVX2-only CPU (Numba's AVX2_TARGET, CPUID masked)
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from benchmarks.common import AVX2_TARGET_OPTION, pin_environment

    pin_environment(threads=1, avx2_target=AVX2_TARGET_OPTION in sys.argv)  # --avx2-target: as on an AVX2-only CPU

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.common import generation_runs, git_revision, machine_description  # noqa: E402
from nanoopt import data, models  # noqa: E402
from nanoopt.train_lm import LMTrainConfig, LMTrainer, evaluate_lm, lr_schedule  # noqa: E402

SIZES = dict(block_size=64, n_layer=4, n_head=4, n_embd=128)
VALIDATION_WINDOWS = 1200


def prepare() -> tuple[data.CharTokenizer, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    text = data.load_shakespeare()
    tokenizer = data.CharTokenizer.from_text(text)
    train_ids = tokenizer.encode(data.load_shakespeare("train"))
    val_ids = tokenizer.encode(data.load_shakespeare("val"))
    validation = data.validation_windows(val_ids, SIZES["block_size"], count=VALIDATION_WINDOWS)
    return tokenizer, train_ids, val_ids, validation


GENERATION_REPEATS = 5  # timed generations per framework and length, taken in turns; the fastest counts


class TorchTrainer:
    """nanoGPT's training step in PyTorch, with the same schedule, groups and clipping as nanoopt's LMTrainer."""

    def __init__(self, initial: dict, vocab: int, config: LMTrainConfig, sizes: dict | None = None) -> None:
        import torch

        from benchmarks.torch_gpt import TorchGPT

        self.torch, self.config, self.vocab = torch, config, vocab
        torch.set_num_threads(1)
        self.model = TorchGPT(vocab_size=vocab, **(sizes or SIZES))
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in initial.items()})
        self.params = list(self.model.parameters())
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas)

    def step(self, x: np.ndarray, y: np.ndarray, iteration: int) -> float:
        torch = self.torch
        for group in self.optimizer.param_groups:
            group["lr"] = lr_schedule(iteration, self.config)
        self.model.train()
        logits = self.model(torch.from_numpy(x))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), torch.from_numpy(y).reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> float:
        torch = self.torch
        self.model.eval()
        total = 0.0
        with torch.no_grad():
            for begin in range(0, len(x), batch_size):
                xb, yb = torch.from_numpy(x[begin:begin + batch_size]), torch.from_numpy(y[begin:begin + batch_size])
                logits = self.model(xb)
                total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab),
                                                                 yb.reshape(-1))) * len(xb)
        return total / len(x)

    def generate(self, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
        return self.model.generate(self.torch.from_numpy(prompt), new_tokens, temperature=0.0).numpy()


def run_seed(seed: int, vocab: int, train_ids: np.ndarray, validation, config: LMTrainConfig,
             prompt: np.ndarray, lengths: tuple[int, ...]) -> tuple[dict, dict | None]:
    """Train both frameworks in lockstep (one nanoopt step, then one PyTorch step on the same batch), so that
    the load of the machine weighs on both alike; then validate and generate."""
    no.manual_seed(seed)
    model = models.gpt(vocab_size=vocab, **SIZES)
    ours = LMTrainer(model, config)
    try:
        theirs = TorchTrainer(model.state_dict(), vocab, config)
    except ImportError:
        theirs = None
    rng = np.random.default_rng(seed)
    seconds: dict[str, list[float]] = {"nanoopt": [], "PyTorch": []}
    for iteration in range(config.max_iters):
        x, y = data.sample_windows(train_ids, SIZES["block_size"], config.batch_size, rng)
        for name, trainer in (("nanoopt", ours), ("PyTorch", theirs)):
            if trainer is None:
                continue
            start = time.perf_counter()
            trainer.step(x, y, iteration)
            seconds[name].append(time.perf_counter() - start)
    result = dict(val=evaluate_lm(model, *validation), ms=1000 * float(np.median(seconds["nanoopt"])))
    reference = None if theirs is None else dict(val=theirs.evaluate(*validation),
                                                 ms=1000 * float(np.median(seconds["PyTorch"])))
    for n in lengths:
        generators = [lambda k: model.generate(prompt, k, temperature=0.0),
                      lambda k: model.generate(prompt, k, temperature=0.0, use_cache=False)]
        if theirs is not None:
            generators.append(lambda k: theirs.generate(prompt, k))
        rates = generation_runs(generators, n, GENERATION_REPEATS)  # in turns: a slower stretch weighs on all
        (result[f"cache{n}"], cached), (result[f"plain{n}"], plain) = rates[0], rates[1]
        result[f"same{n}"] = bool(np.array_equal(cached, plain))
        result[f"tokens{n}"] = result["tokens"] = np.asarray(cached)
        if theirs is not None:
            reference[f"plain{n}"], tokens = rates[2]
            reference[f"same{n}"] = bool(np.array_equal(tokens, cached))
    return result, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2000, help="training steps (the cosine ends at the last one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated at batch 1")
    parser.add_argument("--avx2-target", action="store_true",
                        help="as an AVX2-only CPU runs it: Numba's AVX2 target, PyTorch on AVX2, CPUID masked")
    args = parser.parse_args()
    tokenizer, train_ids, _, validation = prepare()
    vocab = tokenizer.vocab_size
    config = LMTrainConfig(max_iters=args.iters, lr_decay_iters=args.iters, warmup_iters=min(100, args.iters // 2))
    prompt = tokenizer.encode("\n")[None]
    within = SIZES["block_size"] - 1  # new tokens that fit the context: the cache's own regime
    lengths = (within, args.new_tokens)
    print(f"## Character-level GPT on Shakespeare ({args.iters} steps, 1 thread)\n")
    print(f"Machine: {machine_description()}; commit {git_revision()}\n")
    print(f"Data: {len(train_ids):,} training tokens, {len(validation[0]) * SIZES['block_size']:,} validation "
          f"tokens (fixed windows), vocabulary {vocab}. Model: {SIZES}, batch {config.batch_size}. Steps of both "
          "frameworks alternate on the same batches; ms / step is the median. Generation: batch 1, temperature 0, "
          f"after a one-character prompt; {within} new tokens fit the context, {args.new_tokens} slide it; tok/s "
          f"from the fastest of {GENERATION_REPEATS} runs per framework and length, the frameworks' runs taken in "
          "turns.\n")
    print(f"| seed | framework | val loss | ms / step | tok/s {within} new, cache | {within}, no cache | "
          f"tok/s {args.new_tokens} new, cache | {args.new_tokens}, no cache |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    summary = []
    for seed in args.seeds:
        config.seed = seed
        ours, theirs = run_seed(seed, vocab, train_ids, validation, config, prompt, lengths)
        print(f"| {seed} | nanoopt | {ours['val']:.4f} | {ours['ms']:.1f} | {ours[f'cache{within}']:,.0f} | "
              f"{ours[f'plain{within}']:,.0f} | {ours[f'cache{args.new_tokens}']:,.0f} | "
              f"{ours[f'plain{args.new_tokens}']:,.0f} |", flush=True)
        if theirs is None:
            print(f"| {seed} | PyTorch | torch not installed | | | | | |")
            continue
        print(f"| {seed} | PyTorch | {theirs['val']:.4f} | {theirs['ms']:.1f} | - | {theirs[f'plain{within}']:,.0f} "
              f"| - | {theirs[f'plain{args.new_tokens}']:,.0f} |", flush=True)
        summary.append(f"seed {seed}: val loss nanoopt - PyTorch {ours['val'] - theirs['val']:+.4f}, step time "
                       f"x{ours['ms'] / theirs['ms']:.2f}, cached generation / PyTorch cache-less generation "
                       f"x{ours[f'cache{within}'] / theirs[f'plain{within}']:.2f} ({within} tokens), "
                       f"x{ours[f'cache{args.new_tokens}'] / theirs[f'plain{args.new_tokens}']:.2f} "
                       f"({args.new_tokens} tokens); tokens with cache = without: "
                       f"{ours[f'same{within}'] and ours[f'same{args.new_tokens}']}; = PyTorch's: "
                       f"{theirs[f'same{within}'] and theirs[f'same{args.new_tokens}']}")
    print("\n" + "\n".join(f"- {line}" for line in summary))
    print("\nSample (nanoopt, last seed, temperature 0):\n")
    print("```\n" + tokenizer.decode(ours["tokens"][0]).strip() + "\n```")


if __name__ == "__main__":
    main()
