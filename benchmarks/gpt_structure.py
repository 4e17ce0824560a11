"""Structured compression of the trained character-level GPT (issue 18, points 3 and 4), in one run.

Starting from a trained 4-layer, 128-wide GPT checkpoint (``examples/chargpt.py`` / ``benchmarks.chargpt``):

1. **Heads** (Michel et al. 2019): importance E|dL/dxi_h| on 128 calibration windows of the training split,
   the 25% least important heads (globally, scores l2-normalised per layer) removed physically, then a healing
   finetune; speed of the pruned against the float model (forward of a batch of windows, and generation at
   batch 1 with the KV cache), measured here, in the same run.
2. **Blocks** (Gromov et al. 2024; Men et al. 2024): the block with the smallest angular distance between its
   input and output (per token, on the calibration windows) deleted, then the same healing finetune.
   Control: the float model finetuned with the same recipe for the same number of steps.
3. **Distillation**: a 2-block student of the same width, trained from the same random initialisation twice
   for the same steps and windows: from the 4-block teacher (token-level logit KD + hidden-state matching +
   MiniLM attention and value relations, :func:`nanoopt.distill.gpt.distill_gpt`) and from scratch
   (:func:`nanoopt.train_lm.train_lm`).

Every figure is validation loss on fixed windows of the last 10% of the text.

    python -m benchmarks.gpt_structure [--checkpoint chargpt.npz] [--heal-iters 200] [--distill-iters 600] [--ablation]
"""

from __future__ import annotations

if __name__ == "__main__":
    from benchmarks.common import pin_environment

    pin_environment(threads=1)

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import nanoopt as no  # noqa: E402
from benchmarks.chargpt import prepare  # noqa: E402
from benchmarks.common import best_seconds, git_revision, machine_description  # noqa: E402
from benchmarks.compress_gpt import trained_gpt  # noqa: E402
from nanoopt import data, models, prune  # noqa: E402
from nanoopt.distill.gpt import GPTDistillConfig, distill_gpt  # noqa: E402
from nanoopt.train_lm import LMTrainConfig, evaluate_lm, train_lm  # noqa: E402


def heal_config(iters: int) -> LMTrainConfig:
    """The finetune after pruning and for the float control: short warmup, cosine from 3e-4 to 3e-5."""
    return LMTrainConfig(max_iters=iters, learning_rate=3e-4, min_lr=3e-5, warmup_iters=max(iters // 10, 1),
                         lr_decay_iters=iters, seed=1)


def speed(model: models.GPT, windows: np.ndarray) -> tuple[float, float]:
    """(seconds per forward of ``windows`` in eval mode without a graph, generated tokens/s at batch 1 with
    the KV cache for 63 tokens after a 1-token prompt)."""
    model.eval()

    def forward() -> None:
        with no.no_grad():
            model(windows)
    seconds = best_seconds(forward, repeats=5)
    prompt = windows[:1, :1]
    model.generate(prompt, 4, temperature=0.0)
    start = time.perf_counter()
    model.generate(prompt, 63, temperature=0.0)
    return seconds, 63 / (time.perf_counter() - start)


def heal_and_compare(part: str, model: models.GPT, float_model: models.GPT, train_ids: np.ndarray,
                     validation: tuple[np.ndarray, np.ndarray], iters: int, base: float, control: float) -> None:
    """Finetune the pruned ``model`` with :func:`heal_config`, print its validation loss against the float
    model's (``base``) and the float control's, finetuned with the same recipe (``control``), then its
    :func:`speed` on 64 validation windows against ``float_model``'s, measured now."""
    train_lm(model, train_ids, heal_config(iters), progress=False)
    healed = evaluate_lm(model, *validation)
    print(f"{part}: after {iters} healing steps {healed:.4f} ({healed - base:+.4f} vs float, "
          f"{healed - control:+.4f} vs the finetuned float control)")
    windows = validation[0][:64]
    f_fwd, f_gen = speed(float_model, windows)
    p_fwd, p_gen = speed(model, windows)
    print(f"{part}: forward of 64 windows {1000 * f_fwd:.1f} ms -> {1000 * p_fwd:.1f} ms ({f_fwd / p_fwd:.2f}x); "
          f"generation {f_gen:.0f} -> {p_gen:.0f} tokens/s ({p_gen / f_gen:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path,
                        default=Path.home() / ".cache" / "nanoopt" / "chargpt-2000-seed0.npz",
                        help="the trained GPT (benchmarks/compress_gpt.py's; trained and saved there if absent)")
    parser.add_argument("--heal-iters", type=int, default=200)
    parser.add_argument("--distill-iters", type=int, default=600)
    parser.add_argument("--head-amount", type=float, default=0.25)
    parser.add_argument("--val-windows", type=int, default=1200)
    parser.add_argument("--ablation", action="store_true", help="also distil with each loss term left out")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: heads,blocks,distill")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    if not args.checkpoint.exists():
        tokenizer, train_ids, _, _ = prepare()
        trained_gpt(tokenizer, train_ids, 2000, args.checkpoint)
    state = no.io.load(str(args.checkpoint))
    float_model, tokenizer = models.GPT.from_checkpoint_state(state)
    block = float_model.config.block_size
    train_ids = tokenizer.encode(data.load_shakespeare("train"))
    val_ids = tokenizer.encode(data.load_shakespeare("val"))
    validation = data.validation_windows(val_ids, block, count=args.val_windows)
    calibration = data.validation_windows(train_ids, block, count=128, seed=4321)   # from the training split
    print(f"# {machine_description()}; {git_revision()}")
    base = evaluate_lm(float_model, *validation)
    print(f"float model: {float_model.num_parameters():,} parameters, validation loss {base:.4f}")

    def fresh() -> models.GPT:
        return models.GPT.from_checkpoint_state(state)[0]

    control = None
    if not {"heads", "blocks"} <= skip:
        model = fresh()
        start = time.perf_counter()
        train_lm(model, train_ids, heal_config(args.heal_iters), progress=False)
        control = evaluate_lm(model, *validation)
        print(f"float control finetuned {args.heal_iters} steps: {control:.4f} ({control - base:+.4f}; "
              f"{time.perf_counter() - start:.0f} s)")

    if "heads" not in skip:
        model = fresh()
        start = time.perf_counter()
        scores = prune.head_importance(model, calibration)
        heads = prune.select_heads(scores, args.head_amount)
        prune.prune_heads(model, heads)
        seconds = time.perf_counter() - start
        pruned = evaluate_lm(model, *validation)
        print(f"heads: importance {({k[-1]: np.round(v, 3).tolist() for k, v in scores.items()})}")
        print(f"heads: removed {heads} ({seconds:.1f} s); per block {[b.attn.n_head for b in model.transformer['h']]}"
              f", {model.num_parameters():,} parameters; validation loss {pruned:.4f} ({pruned - base:+.4f})")
        heal_and_compare("heads", model, fresh(), train_ids, validation, args.heal_iters, base, control)

    if "blocks" not in skip:
        model = fresh()
        distances = prune.block_angular_distances(model, calibration[0])
        removed = prune.prune_blocks(model, calibration[0], count=1)
        cut = evaluate_lm(model, *validation)
        print(f"blocks: angular distances {({k: round(v, 4) for k, v in distances.items()})}; removed {removed}, "
              f"validation loss {cut:.4f} ({cut - base:+.4f})")
        heal_and_compare("blocks", model, fresh(), train_ids, validation, args.heal_iters, base, control)

    if "distill" not in skip:
        teacher = fresh()
        c = teacher.config
        config = LMTrainConfig(max_iters=args.distill_iters, lr_decay_iters=args.distill_iters,
                               warmup_iters=min(100, args.distill_iters // 4), seed=2)

        def student() -> models.GPT:
            no.manual_seed(7)
            return models.gpt(c.vocab_size, c.block_size, 2, c.n_head, c.n_embd)
        start = time.perf_counter()
        scratch = student()
        train_lm(scratch, train_ids, config, progress=False)
        scratch_loss = evaluate_lm(scratch, *validation)
        print(f"distill: 2-block student from scratch, {args.distill_iters} steps: {scratch_loss:.4f} "
              f"({time.perf_counter() - start:.0f} s)")
        variants = [("KD + hidden + MiniLM", GPTDistillConfig())]
        if args.ablation:
            variants += [("logit KD only", GPTDistillConfig(hidden_weight=0.0, attention_weight=0.0)),
                         ("KD + MiniLM", GPTDistillConfig(hidden_weight=0.0)),
                         ("KD + hidden", GPTDistillConfig(attention_weight=0.0))]
        for label, distill_config in variants:
            start = time.perf_counter()
            distilled = student()
            distill_gpt(distilled, teacher, train_ids, config, distill_config, progress=False)
            distilled_loss = evaluate_lm(distilled, *validation)
            print(f"distill: 2-block student distilled ({label}), {args.distill_iters} steps: "
                  f"{distilled_loss:.4f} ({distilled_loss - scratch_loss:+.4f} vs scratch; teacher {base:.4f}; "
                  f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
