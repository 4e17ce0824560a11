r"""Layer names given by a user are checked against the model: a misspelt name is an error, never a no-op.

Every API that takes dotted layer names (``QuantConfig(overrides=..., keep_float=...)``, block and layer
candidates of pruning, distillation features) calls :func:`check_layer_names`, whose ``ValueError`` names the
argument, the unknown names with their closest matches, and lists the names the model has.

>>> try:
...     check_layer_names(["fc1", "fc_2"], ["fc1", "relu", "fc2"], "QuantConfig.overrides")
... except ValueError as error:
...     print(*str(error).split(". "), sep=".\n")
QuantConfig.overrides: no such layers in the model: 'fc_2' (did you mean 'fc2'?).
The model's layers are: 'fc1', 'relu', 'fc2'
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = ["check_layer_names"]

MAX_LISTED = 60  # layer names listed in one message (the rest are counted)


def check_layer_names(names: Iterable[str], known: Sequence[str], argument: str, what: str = "layers") -> None:
    """Raise ``ValueError`` if any of ``names`` is not in ``known`` (see the module docstring).

    ``argument`` says where the names came from (``"QuantConfig.keep_float"``); ``what`` what ``known`` holds
    (``"layers"``, ``"blocks"``).

    >>> check_layer_names(["0", "input"], ["0", "1", "input"], "QuantConfig.overrides")    # all known: nothing
    """
    known = [name for name in known if name]  # "" (the model itself) is never written by a user
    known_set = set(known)
    unknown = [name for name in dict.fromkeys(names) if name not in known_set]
    if not unknown:
        return
    described = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), known, n=1)
        described.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    listed = ", ".join(repr(name) for name in known[:MAX_LISTED])
    if len(known) > MAX_LISTED:
        listed += f", ... ({len(known) - MAX_LISTED} more)"
    raise ValueError(f"{argument}: no such {what} in the model: {', '.join(described)}. The model's {what} are: "
                     f"{listed or '(none)'}")
