"""Pruning: masks, methods, criteria, schedules, physical surgery and analysis (see each module's docstring).

PyTorch's ``torch.nn.utils.prune`` semantics: pruning ``module.weight`` moves the parameter to ``weight_orig``,
registers the buffer ``weight_mask`` and recomputes ``weight = weight_orig * weight_mask`` before each forward;
``remove`` makes it permanent. Physical removal of channels is a separate, explicit step (``shrink``).
One-shot pruning of the Linear layers of any model from calibration data, unstructured or N:M: ``wanda``
(Sun et al. 2023) and ``sparsegpt`` (Frantar & Alistarh 2023).

>>> from nanoopt import nn, prune
>>> layer = prune.l1_unstructured(nn.Linear(10, 10), "weight", amount=0.9)
>>> int((layer.weight.data == 0).sum())
90
"""

from nanoopt.prune.analysis import (  # the format_* helpers stay reachable, not exported
    format_sensitivity,  # noqa: F401
    format_sparsity,  # noqa: F401
    layer_sensitivity,
    sparsity_report,
)
from nanoopt.prune.criteria import (
    MovementScores,
    bn_l1_penalty,
    bn_scale,
    fpgm,
    magnitude,
    prunable_parameters,
    snip,
    taylor,
)
from nanoopt.prune.heads import dead_heads, head_importance, mask_heads, prune_heads, select_heads
from nanoopt.prune.masks import (
    apply_mask,
    get_mask,
    is_pruned,
    load_pruned_state_dict,
    pruned_parameters,
    remove,
    remove_all,
)
from nanoopt.prune.methods import (
    L1Unstructured,
    RandomUnstructured,
    custom_from_mask,
    global_unstructured,
    identity,
    l1_unstructured,
    ln_structured,
    nm_sparsity,
    random_structured,
    random_unstructured,
)
from nanoopt.prune.schedules import (
    GradualPruning,
    cubic_sparsity,
    iterative,
    lottery_ticket,
    mask_sparsity,
    one_shot,
    prune_to_sparsity,
)
from nanoopt.prune.sparse import SparseLinear, to_sparse
from nanoopt.prune.sparsegpt import sparsegpt  # the function (the module is nanoopt.prune.sparsegpt)
from nanoopt.prune.surgery import (
    ShrinkReport,
    block_angular_distances,
    dependency_groups,
    prune_blocks,
    prune_channels,
    remove_blocks,
    remove_gpt_blocks,
    shrink,
    shrink_gpt,
)
from nanoopt.prune.wanda import wanda  # the function (the module is nanoopt.prune.wanda)

# the user's vocabulary (submodules such as prune.surgery stay importable, but are not exported)
__all__ = [
    "L1Unstructured", "RandomUnstructured", "apply_mask", "custom_from_mask", "get_mask", "global_unstructured",
    "identity", "is_pruned", "l1_unstructured", "ln_structured", "load_pruned_state_dict", "nm_sparsity",
    "pruned_parameters", "random_structured", "random_unstructured", "remove", "remove_all",
    "ShrinkReport", "block_angular_distances", "dependency_groups", "prune_blocks", "prune_channels",
    "remove_blocks", "shrink",
    "layer_sensitivity", "sparsity_report",
    "MovementScores", "bn_l1_penalty", "bn_scale", "fpgm", "magnitude", "prunable_parameters", "snip", "taylor",
    "GradualPruning", "cubic_sparsity", "iterative", "lottery_ticket", "mask_sparsity", "one_shot",
    "prune_to_sparsity", "SparseLinear", "to_sparse",
    "sparsegpt", "wanda",  # one-shot pruning from calibration data (SparseGPT, Wanda)
    "dead_heads", "head_importance", "mask_heads", "prune_heads", "select_heads", "remove_gpt_blocks", "shrink_gpt",
]
