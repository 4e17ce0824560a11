"""Physical pruning of the GPT: dead heads and MLP neurons (:func:`shrink_gpt`), and whole blocks.

:func:`nanoopt.prune.shrink` on a GPT lands here. The channel tracer of :mod:`nanoopt.prune.surgery` follows
channels along axis 1 of (N, C, ...) activations; a GPT's activations are (B, T, C) with channels last, and its
residual stream is pinned anyway (every block reads it through a LayerNorm). What can shrink is inside the
blocks, and each part is handled where its channels live:

* **MLP neurons.** A block's MLP, ``c_proj(GELU(c_fc(x)))``, acts on every token alone, so it is shrunk by
  :func:`~nanoopt.prune.surgery.shrink` as a model of its own on (tokens, C) rows: a neuron whose ``c_fc`` row
  is all masked outputs the constant GELU(b_j), which is folded into ``c_proj``'s bias, and its row and column
  go (mask with e.g. ``prune.ln_structured(block.mlp.c_fc, "weight", 0.25, n=2, dim=0)``).
* **Heads.** A head whose columns of ``c_proj`` are all zero (:func:`~nanoopt.prune.heads.mask_heads`)
  contributes nothing; it is removed with :func:`~nanoopt.prune.heads.prune_heads`.

Block removal (Gromov et al. 2024; Men et al. 2024, ShortGPT) deletes a block from ``transformer.h`` (the later
blocks move up one index) and lowers ``config.n_layer``, so the KV cache and checkpoints follow.

>>> import numpy as np, nanoopt as no
>>> from nanoopt import models, prune
>>> no.manual_seed(0)
>>> model = models.gpt(vocab_size=7, block_size=8, n_layer=2, n_head=2, n_embd=8)
>>> _ = prune.ln_structured(model.transformer["h"][0].mlp.c_fc, "weight", amount=0.5, n=2, dim=0)
>>> x = np.random.default_rng(0).integers(0, 7, (2, 8))
>>> expected = model(x).data
>>> report = prune.shrink(model, x)
>>> model.transformer["h"][0].mlp.c_fc.out_features
16
>>> bool(np.allclose(model(x).data, expected, atol=1e-5))
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from nanoopt.models_gpt import GPT
from nanoopt.nn import Module
from nanoopt.nn import layers as L
from nanoopt.prune.heads import dead_heads, gpt_blocks, prune_heads
from nanoopt.prune.surgery import GroupReport, ShrinkReport, shrink


def shrink_gpt(model: Module, example_input: Any = None) -> ShrinkReport:
    """Remove every dead MLP neuron and every dead head of a GPT, in place (see the module docstring).

    ``example_input`` (token ids) is accepted for :func:`~nanoopt.prune.shrink`'s signature and not needed: a
    dead neuron's output is a constant whatever the input. The report has one group per MLP (``c_fc``'s
    neurons) and one per attention (its merged heads, in channels).

    >>> from nanoopt import models
    >>> print(shrink_gpt(models.gpt(5, 4, 1, 2, 8)).groups[0])
    group transformer.h.0.attn.c_attn -> read by transformer.h.0.attn.c_proj: 8 -> 8 channels
    """
    blocks = gpt_blocks(model, "prune.shrink")
    before = model.num_parameters()
    reports = []
    heads = dead_heads(model)
    for name, block in blocks.items():
        attn = block.attn
        inner = attn.inner_dim
        if name in heads and len(heads[name]) == attn.n_head:
            raise ValueError(f"prune.shrink refuses to remove every head of block {name!r} (all "
                             f"{attn.n_head} masked): the attention would be cut out")
        if name in heads:
            prune_heads(model, {name: heads[name]})
        reports.append(GroupReport([f"{name}.attn.c_attn"], [f"{name}.attn.c_proj"], inner, attn.inner_dim))
        rows = np.zeros((1, block.mlp.c_fc.in_features), dtype=np.float32)
        mlp_report = shrink(block.mlp, rows)
        for group in mlp_report.groups:
            group.producers = [f"{name}.mlp.{p}" for p in group.producers]
            group.readers = [f"{name}.mlp.{r}" for r in group.readers]
            if not group.pinned:
                reports.append(group)
    return ShrinkReport(reports, before, model.num_parameters())


def remove_gpt_blocks(model: GPT, names: Sequence[str]) -> GPT:
    """Delete the named blocks (``"transformer.h.<i>"``) from a GPT; later blocks move up; ``n_layer`` drops.

    >>> from nanoopt import models
    >>> model = remove_gpt_blocks(models.gpt(5, 4, 3, 1, 4), ["transformer.h.1"])
    >>> model.config.n_layer, len(model.transformer["h"])
    (2, 2)
    """
    blocks = gpt_blocks(model, "remove_blocks")
    missing = [n for n in names if n not in blocks]
    if missing:
        raise ValueError(f"remove_blocks: no GPT block {missing[0]!r}; the blocks are {list(blocks)}")
    if len(set(names)) >= len(blocks):
        raise ValueError(f"remove_blocks: removing all {len(blocks)} blocks of the GPT is refused")
    kept = [block for name, block in blocks.items() if name not in set(names)]
    model.transformer["h"] = L.ModuleList(kept)
    model.config = dataclasses.replace(model.config, n_layer=len(kept))
    return model
