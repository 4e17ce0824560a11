"""Test-session settings: one BLAS thread and two Numba threads per test process, whatever the machine.

The suite runs small matrix products; with two cores shared by the test process and anything else running,
OpenBLAS's thread hand-offs can make them orders of magnitude slower. OPENBLAS_CORETYPE, where the machine sets
it, is left alone.

Numba's thread count is pinned too (``NUMBA_NUM_THREADS``, read once when Numba starts its thread pool, so it is
set here, before any test imports Numba): to 2, not to the machine's core count, so that the threaded kernel
paths (taken only when ``numba.get_num_threads() > 1``) are exercised on every machine, a one-core CI runner
included, and a many-core machine does not start dozens of threads for tests of small products. A value the
caller set in the environment wins, as for BLAS.

Training-based tests are marked ``slow`` and are part of the default run (the README's command and ``.ci/run``
run the whole suite); ``python -m pytest -m "not slow"`` runs the rest while iterating.
"""

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")
