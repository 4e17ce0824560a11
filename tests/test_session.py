"""The test session's own settings (conftest.py): pinned thread counts."""

import os

import numba


def test_numba_thread_count_is_pinned_for_the_session():
    assert os.environ["NUMBA_NUM_THREADS"] == str(numba.config.NUMBA_NUM_THREADS)
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    assert os.environ["OPENBLAS_NUM_THREADS"] and os.environ["OMP_NUM_THREADS"]
