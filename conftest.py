"""Test-session settings: one BLAS thread per test process.

The suite runs small matrix products; with two cores shared by the test process and anything else running,
OpenBLAS's thread hand-offs can make them orders of magnitude slower. OPENBLAS_CORETYPE, where the machine sets
it, is left alone.
"""

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
