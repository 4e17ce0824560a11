"""Sweeps: the same table serially, on a process pool and (when installed) on a local Dask cluster."""

import concurrent.futures

import pytest

import nanoopt as no
from nanoopt import data, io, models
from nanoopt.pipeline import sweep as sweep_module
from nanoopt.pipeline.sweep import format_sweep, grid, sweep

DATA = {"dataset": "digits", "train_limit": 512}


@pytest.fixture(scope="module")
def float_file(tmp_path_factory):
    """A float checkpoint every point starts from (trained 5 epochs on 512 digits)."""
    path = tmp_path_factory.mktemp("sweep") / "float.npz"
    no.manual_seed(0)
    model = models.lenet_300_100(in_features=64)
    x, y = data.load_digits("train")
    no.fit(model, (x[:512], y[:512]), epochs=5, lr=0.05, batch_size=32, progress=False)
    io.save(model, path)
    return path


def points():
    return grid(bits=(32, 4), sparsity=(0.0, 0.5), distill=(False, True))[2:6]


@pytest.mark.slow
def test_process_pool_gives_the_serial_table(float_file):
    model = {"architecture": "lenet_300_100", "args": {"in_features": 64}, "file": str(float_file)}
    serial = sweep(points(), model, DATA, executor="serial", finetune_epochs=1, qat_epochs=1)
    pooled = sweep(points(), model, DATA, finetune_epochs=1, qat_epochs=1)   # default: a process pool
    assert serial == pooled
    assert len({(row["accuracy"], row["stored_bytes"]) for row in serial}) > 1   # the points differ
    assert all(row["stored_bytes"] < row["float_bytes"] / 6 for row in serial if row["bits"] == 4)
    assert all(row["accuracy"] > 0.8 for row in serial)
    assert [row["weight_bits"] for row in serial] == [[32], [4], [32], [4]]
    assert "| 4 | 50% | no |" in format_sweep(serial)


@pytest.mark.slow
def test_dask_gives_the_serial_table(float_file):
    distributed = pytest.importorskip("distributed", reason="Dask's distributed executor is the optional extra "
                                                            "'dask' (pip install 'dask[distributed]')")
    model = {"architecture": "lenet_300_100", "args": {"in_features": 64}, "file": str(float_file)}
    chosen = points()[:2]
    serial = sweep(chosen, model, DATA, executor="serial", finetune_epochs=1, qat_epochs=1)
    with distributed.Client(n_workers=2, threads_per_worker=1, processes=True) as client:
        assert serial == sweep(chosen, model, DATA, executor=client.get_executor(), finetune_epochs=1, qat_epochs=1)


def test_bad_executor_and_bad_points_are_refused_before_work(monkeypatch):
    monkeypatch.setattr(sweep_module, "run_point", lambda *a: pytest.fail("work started"))
    model = {"architecture": "tiny_mlp"}
    with pytest.raises(TypeError, match="executor must be None, 'serial' or a concurrent.futures.Executor"):
        sweep(grid(bits=(8,), sparsity=(0.0,), distill=(False,)), model, DATA, executor=4)
    with pytest.raises(ValueError, match=r"steps\[0\] \(prune\): sparsity must be in"):
        sweep(grid(bits=(8,), sparsity=(1.5,), distill=(False,)), model, DATA,
              executor=concurrent.futures.ThreadPoolExecutor(1))
