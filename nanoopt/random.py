"""The one global random number generator of nanoopt.

Every random draw in the library (weight initialisation, dropout masks, shuffling without an explicit seed,
random pruning without an explicit seed) comes from :func:`get_rng`, so ``manual_seed(s)`` makes a whole run
reproducible, as ``torch.manual_seed`` does.

>>> import nanoopt as no
>>> no.manual_seed(0); a = no.random.get_rng().random()
>>> no.manual_seed(0); b = no.random.get_rng().random()
>>> a == b
True
"""

from __future__ import annotations

import numpy as np

_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reset the global generator to ``numpy.random.default_rng(seed)``."""
    global _rng
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"manual_seed expects a non-negative int, got {seed!r}")
    _rng = np.random.default_rng(int(seed))


def get_rng() -> np.random.Generator:
    """The global generator (replaced, not mutated, by :func:`manual_seed`)."""
    return _rng
