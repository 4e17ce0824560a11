"""One-shot recipe steps from calibration data: weight-only GPTQ / AWQ / RTN, SmoothQuant and W8A8, Wanda and
SparseGPT, attention-head and block removal.

Each step is a thin call of the technique's public function (``quant.gptq``, ``quant.awq``, ``quant.rtn``,
``quant.smooth_quant``, ``quant.quantize_w8a8``, ``prune.wanda``, ``prune.sparsegpt``, ``prune.head_importance``
/ ``select_heads`` / ``prune_heads``, ``prune.prune_blocks``), registered with its schema and place in the order
(:func:`~nanoopt.pipeline.steps.register_step`). Calibration data: the first ``calibration`` training images of
an image classifier, or ``calibration`` random windows of the training text (seeded by the run's seed) for the GPT
on Shakespeare.

* ``gptq``, ``awq``, ``rtn``: the Linear layers (minus ``ignore``; for the GPT, by default its head, which is tied
  to the token embedding) become weight-only layers (float -> integer). With ``keep_float = true`` the rounded
  weights are written back into float Linears instead (the model stays float), so a later step can start from
  them: e.g. GPTQ W4 -> SmoothQuant -> W8A8, whose int8 weights then hold the GPTQ-rounded values on the int8
  grid (nanoopt has no int4 x int8 kernel: the file is W8A8's size).
* ``smooth_quant`` (float -> float, GPT): SmoothQuant's factors folded into each LayerNorm -> Linear pair
  (Xiao et al. 2022); ``w8a8`` (float -> integer, GPT): int8 Linears and integer attention, calibrated.
* ``wanda``, ``sparsegpt`` (float -> float, masks kept; Sun et al. 2023, Frantar & Alistarh 2023): unstructured
  ``sparsity`` or ``n``:``m``.
* ``heads`` (GPT): Michel et al.'s head importance, the ``amount`` lowest heads removed physically; ``blocks``: the
  ``count`` blocks that change their input least (ShortGPT's angular distance) removed.

>>> from nanoopt.pipeline import STEPS
>>> sorted(STEPS["gptq"].tasks), sorted(STEPS["w8a8"].tasks)
(['classify', 'lm'], ['lm'])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nanoopt import nn, prune, quant
from nanoopt.models_gpt import GPT
from nanoopt.pipeline.steps import Context, _keep_teacher, calibration_inputs, calibration_pairs, register_step
from nanoopt.quant.algorithms.awq import InputScaled

__all__ = ["AWQStep", "BlocksStep", "GPTQStep", "HeadsStep", "PruneCalibratedStep", "RTNStep", "SmoothQuantStep",
           "W8A8Step"]

BOTH = ("classify", "lm")


def _check_calibration(count: int) -> None:
    if count < 1:
        raise ValueError(f"calibration must be >= 1 (images or windows), got {count}")


def _check_grid(bits: int, group_size: int | None) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")


def _ignore(model: nn.Module, ignore: list[str] | None) -> list[str]:
    """The layers left in float: as given, else the GPT's head (tied to the token embedding), else none."""
    if ignore is not None:
        return list(ignore)
    return ["lm_head"] if isinstance(model, GPT) else []


def _to_float(model: nn.Module) -> nn.Module:
    """Every weight-only layer back to an ``nn.Linear`` holding its dequantized (rounded) weight, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) or not hasattr(module, "dequantized_weight"):
            continue
        bias = getattr(module, "bias", None)
        out_features, in_features = module.weight_shape
        linear = nn.Linear(in_features, out_features, bias=bias is not None)
        linear.weight.data = np.asarray(module.dequantized_weight(), np.float32).reshape(out_features, in_features)
        if bias is not None:
            linear.bias.data = np.asarray(bias, np.float32).copy()
        model.set_submodule(name, linear)
    return model


# ============================================================================ weight-only rounding
@dataclass
class GPTQStep:
    bits: int = 4                     # weight bits
    group_size: int | None = 128      # inputs per grid (must divide every quantized layer's in_features; None: row)
    symmetric: bool = False           # symmetric grids (no zero point), or asymmetric min-max
    act_order: bool = False           # columns by decreasing Hessian diagonal (static groups)
    percdamp: float = 0.01            # damping lambda / mean(diag H)
    calibration: int = 128            # calibration images or text windows
    ignore: list[str] | None = None   # Linear layers left in float (default: the GPT's tied head, else none)
    keep_float: bool = False          # write the rounded weights back into float Linears (the model stays float)

    def check(self) -> None:
        _check_grid(self.bits, self.group_size)
        _check_calibration(self.calibration)
        if not 0.0 <= self.percdamp < 1.0:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp}")


def _rebuild_rounded(model: nn.Module, step: Any, record: dict[str, Any], example: np.ndarray) -> nn.Module:
    """The same layers as weight-only ones (any codes: the stored state replaces them)."""
    if step.keep_float:
        return model
    rounded = quant.rtn(prune.remove_all(model), bits=step.bits, group_size=step.group_size,
                        symmetric=step.symmetric, ignore=record["ignore"])
    for name in record.get("scaled", []):   # AWQ's explicit input scales
        inner = rounded.get_submodule(name)
        rounded.set_submodule(name, InputScaled(inner, np.ones(inner.weight_shape[1], np.float32)))
    return rounded


def _rounded_state(step: Any) -> str:
    """keep_float rounding leaves a float model: the order check sees the state the step really produces."""
    return "float" if step.keep_float else "integer"


def _finish_rounding(context: Context, rounded: nn.Module, keep_float: bool, ignore: list[str]) -> None:
    context.model = _to_float(rounded) if keep_float else rounded
    scaled = [name for name, module in rounded.named_modules() if isinstance(module, InputScaled)]
    context.records.append({"kind": "rounding", "ignore": ignore, "scaled": scaled})


@register_step("gptq", GPTQStep, accepts=("float",), produces=_rounded_state, rebuild=_rebuild_rounded,
               tasks=BOTH)
def gptq(context: Context, step: GPTQStep) -> None:
    """GPTQ (Frantar et al. 2023): weight-only rounding with second-order error feedback."""
    _keep_teacher(context)
    ignore = _ignore(context.model, step.ignore)
    rounded = quant.gptq(context.model, calibration_inputs(context, step.calibration), bits=step.bits,
                         group_size=step.group_size, symmetric=step.symmetric, act_order=step.act_order,
                         percdamp=step.percdamp, ignore=ignore, progress=context.progress)
    _finish_rounding(context, rounded, step.keep_float, ignore)


@dataclass
class AWQStep:
    bits: int = 4                     # weight bits
    group_size: int | None = 128      # inputs per grid (None: one per row)
    symmetric: bool = False           # symmetric grids, or asymmetric min-max
    rounding: Literal["rtn", "gptq"] = "rtn"   # after scaling: round to nearest (AWQ), or GPTQ
    clip: bool = False                # also search a clamp per group of weights
    calibration: int = 128            # calibration images or text windows
    ignore: list[str] | None = None   # Linear layers left in float (default: the GPT's tied head, else none)

    def check(self) -> None:
        _check_grid(self.bits, self.group_size)
        _check_calibration(self.calibration)

    @property
    def keep_float(self) -> bool:     # AWQ's explicit input scales need the weight-only layers
        return False


@register_step("awq", AWQStep, accepts=("float",), produces="integer", rebuild=_rebuild_rounded, tasks=BOTH)
def awq(context: Context, step: AWQStep) -> None:
    """AWQ (Lin et al. 2024): activation-aware per-channel scaling, then weight-only rounding."""
    _keep_teacher(context)
    ignore = _ignore(context.model, step.ignore)
    rounded = quant.awq(prune.remove_all(context.model), calibration_inputs(context, step.calibration),
                        bits=step.bits, group_size=step.group_size, symmetric=step.symmetric,
                        rounding=step.rounding, clip=step.clip, ignore=ignore, progress=context.progress)
    _finish_rounding(context, rounded, False, ignore)


@dataclass
class RTNStep:
    bits: int = 4                     # weight bits
    group_size: int | None = 128      # inputs per grid (None: one per row)
    symmetric: bool = False           # symmetric grids, or asymmetric min-max
    ignore: list[str] | None = None   # Linear layers left in float (default: the GPT's tied head, else none)
    keep_float: bool = False          # write the rounded weights back into float Linears

    def check(self) -> None:
        _check_grid(self.bits, self.group_size)


@register_step("rtn", RTNStep, accepts=("float",), produces=_rounded_state, rebuild=_rebuild_rounded,
               tasks=BOTH)
def rtn(context: Context, step: RTNStep) -> None:
    """Round to nearest on group grids (the baseline GPTQ and AWQ improve on; no calibration)."""
    _keep_teacher(context)
    ignore = _ignore(context.model, step.ignore)
    rounded = quant.rtn(prune.remove_all(context.model), bits=step.bits, group_size=step.group_size,
                        symmetric=step.symmetric, ignore=ignore)
    _finish_rounding(context, rounded, step.keep_float, ignore)


# ============================================================================ SmoothQuant and W8A8 (the GPT)
@dataclass
class SmoothQuantStep:
    alpha: float = 0.5                # migration strength (eq. 4): 0 keeps the activations, 1 moves it all
    calibration: int = 128            # text windows for the activation maxima

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        _check_calibration(self.calibration)


@register_step("smooth_quant", SmoothQuantStep, accepts=("float",), tasks=("lm",))
def smooth_quant(context: Context, step: SmoothQuantStep) -> None:
    """SmoothQuant (Xiao et al. 2022): per-channel factors folded into each LayerNorm -> Linear pair."""
    _keep_teacher(context)
    context.model = quant.smooth_quant(prune.remove_all(context.model), calibration_inputs(context, step.calibration),
                                       alpha=step.alpha)


@dataclass
class W8A8Step:
    calibration: int = 128            # text windows that calibrate the activation grids
    alpha: float | None = None        # SmoothQuant first with this alpha (None: not here; use a smooth_quant step)
    per_token: bool = False           # activation scales per token at run time (dynamic) instead of static grids

    def check(self) -> None:
        _check_calibration(self.calibration)
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def _rebuild_w8a8(model: nn.Module, step: W8A8Step, record: dict[str, Any], example: np.ndarray) -> nn.Module:
    prepared = quant.prepare_w8a8(prune.remove_all(model), quant.W8A8Config(per_token=step.per_token))
    return quant.convert_w8a8(prepared.calibrate(example))   # any grids: the stored state replaces them


@register_step("w8a8", W8A8Step, accepts=("float",), produces="integer", rebuild=_rebuild_w8a8, tasks=("lm",),
               not_after={"heads": "the W8A8 GPT runs config.n_head heads in every block, and heads removes some"})
def w8a8(context: Context, step: W8A8Step) -> None:
    """int8 Linears and integer attention for the GPT (prepare, calibrate, convert)."""
    _keep_teacher(context)
    context.model = quant.quantize_w8a8(prune.remove_all(context.model), calibration_inputs(context, step.calibration),
                                        alpha=step.alpha, config=quant.W8A8Config(per_token=step.per_token))


# ============================================================================ pruning from calibration data
@dataclass
class PruneCalibratedStep:
    sparsity: float | None = None     # fraction of each row's weights set to zero (or give n and m)
    n: int | None = None              # N:M: n zeros ... (with m; instead of sparsity)
    m: int | None = None              # ... in every m consecutive inputs
    calibration: int = 128            # calibration images or text windows
    ignore: list[str] | None = None   # Linear layers left dense (default: the GPT's tied head, else none)

    def check(self) -> None:
        if (self.n is None) != (self.m is None):
            raise ValueError(f"give both n and m (N:M), got n={self.n} and m={self.m}")
        if (self.sparsity is None) == (self.n is None):
            raise ValueError(f"give sparsity, or n and m (N:M), not both and not neither; got "
                             f"sparsity={self.sparsity}, n={self.n}, m={self.m}")
        if self.n is not None and not 0 < self.n < self.m:
            raise ValueError(f"N:M needs 0 < n < m, got n={self.n} and m={self.m}")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        _check_calibration(self.calibration)


def _prune_calibrated(method: Any, context: Context, step: PruneCalibratedStep) -> None:
    _keep_teacher(context)
    method(context.model, calibration_inputs(context, step.calibration), step.sparsity, n=step.n, m=step.m,
           ignore=_ignore(context.model, step.ignore), progress=context.progress)
    context.records.append({"kind": "prune", "sparsity": prune.mask_sparsity(prune.prunable_parameters(context.model))})


@register_step("wanda", PruneCalibratedStep, accepts=("float",), tasks=BOTH)
def wanda(context: Context, step: PruneCalibratedStep) -> None:
    """Wanda (Sun et al. 2023): prune by |weight| x input norm, per output row (masks kept)."""
    _prune_calibrated(prune.wanda, context, step)


@register_step("sparsegpt", PruneCalibratedStep, accepts=("float",), tasks=BOTH)
def sparsegpt(context: Context, step: PruneCalibratedStep) -> None:
    """SparseGPT (Frantar & Alistarh 2023): prune with second-order reconstruction of the rest (masks kept)."""
    _prune_calibrated(prune.sparsegpt, context, step)


# ============================================================================ structure of the GPT
@dataclass
class HeadsStep:
    amount: float = 0.25              # fraction of all attention heads removed (at least one per block survives)
    scope: Literal["global", "layer"] = "global"   # rank all heads together, or per block
    calibration: int = 64             # text windows that score the heads

    def check(self) -> None:
        if not 0.0 < self.amount < 1.0:
            raise ValueError(f"amount must be in (0, 1), got {self.amount}")
        _check_calibration(self.calibration)


def _rebuild_heads(model: nn.Module, step: HeadsStep, record: dict[str, Any], example: np.ndarray) -> nn.Module:
    return prune.prune_heads(prune.remove_all(model), record["heads"])


@register_step("heads", HeadsStep, accepts=("float",), rebuild=_rebuild_heads, tasks=("lm",))
def heads(context: Context, step: HeadsStep) -> None:
    """Remove the least important attention heads (Michel et al. 2019), physically."""
    _keep_teacher(context)
    model = prune.remove_all(context.model)
    chosen = prune.select_heads(prune.head_importance(model, calibration_pairs(context, step.calibration)),
                                step.amount, scope=step.scope)
    context.model = prune.prune_heads(model, chosen)
    context.records.append({"kind": "heads", "heads": chosen})


@dataclass
class BlocksStep:
    count: int = 1                    # blocks removed
    calibration: int = 16             # text windows (or images) that measure each block's angular distance

    def check(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        _check_calibration(self.calibration)


def _rebuild_blocks(model: nn.Module, step: BlocksStep, record: dict[str, Any], example: np.ndarray) -> nn.Module:
    return prune.remove_blocks(prune.remove_all(model), record["blocks"], example)


@register_step("blocks", BlocksStep, accepts=("float",), rebuild=_rebuild_blocks, tasks=BOTH)
def blocks(context: Context, step: BlocksStep) -> None:
    """Remove the blocks that change their input least (ShortGPT's block influence, Men et al. 2024)."""
    _keep_teacher(context)
    context.model = prune.remove_all(context.model)
    chosen = prune.prune_blocks(context.model, calibration_inputs(context, step.calibration), step.count)
    context.records.append({"kind": "blocks", "blocks": chosen})
