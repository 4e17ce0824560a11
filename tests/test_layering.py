"""The layers import one way (docs/architecture.md): every module of the package imports in a fresh interpreter,
and importing a module loads only modules of its own layer and the layers below it.

One subprocess (a fresh interpreter that has imported no nanoopt module; it preloads the third-party packages
numpy, scipy, numba, llvmlite, tqdm and matplotlib only to save time) forks one child per module of the
package, as many at a time as there are CPUs. Each child imports its module into an interpreter holding no
nanoopt module and reports which nanoopt modules that loaded. A circular import, or a module that needs another
to be imported first, fails in its child. (About 25 s of CPU time in all, measured on the development machine.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child interpreter per module (POSIX)")

# modules that import an optional extra when imported (not only when called): they may fail only without it
OPTIONAL_AT_IMPORT = {"nanoopt.pipeline.plot": "matplotlib"}

# the integer kernels (the integer specification and every kernel module that computes on integer codes)
INTEGER_KERNELS = {"nanoopt.spec", "nanoopt.kernels.reference", "nanoopt.kernels.numba_cpu", "nanoopt.kernels.avx2",
                   "nanoopt.kernels.requant", "nanoopt.kernels.lowbit", "nanoopt.kernels.gemm_plan",
                   "nanoopt.kernels.choices"}

# upward imports still to remove, listed in docs/architecture.md ("Known violations")
KNOWN_VIOLATIONS = {"nanoopt.distill.demo"}   # the demo rows move into the face (issue 19)

_CHILDREN = r"""
import importlib, json, os, sys, traceback
import numpy, scipy.linalg, numba, llvmlite.binding, tqdm.auto   # third-party only: no nanoopt module yet
try:
    import matplotlib.pyplot
except ImportError:
    pass
assert not [m for m in sys.modules if m.split(".")[0] == "nanoopt"]
results, running = {}, {}


def collect():
    pid, _ = os.wait()
    name, read = running.pop(pid)
    with os.fdopen(read) as answer:   # a report is a few kB: it fits the pipe, the child never blocks
        text = answer.read()
    results[name] = json.loads(text) if text else {"ok": False, "error": "the child died"}


for name in json.loads(sys.argv[1]):
    if len(running) >= max(os.cpu_count() or 1, 1):
        collect()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: import one module into an interpreter without nanoopt modules
        os.close(read)
        try:
            importlib.import_module(name)
            report = {"ok": True, "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "nanoopt")}
        except BaseException:
            report = {"ok": False, "error": traceback.format_exc()}
        with os.fdopen(write, "w") as out:
            json.dump(report, out)
        os._exit(0)
    os.close(write)
    running[pid] = (name, read)
while running:
    collect()
print(json.dumps(results))
"""


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRAPH = _import_graph()


def layer(module: str) -> int:
    return GRAPH.component(module)[1]


@pytest.fixture(scope="module")
def imported() -> dict[str, dict]:
    """{module: {"ok", "loaded" or "error"}} for every module of the package, each imported in a fresh child."""
    names = sorted(GRAPH.modules())
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _CHILDREN, json.dumps(names)], capture_output=True, text=True,
                          cwd=ROOT, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(results) == names
    return results


def _loaded(imported: dict[str, dict], name: str) -> set[str]:
    assert imported[name]["ok"], imported[name]["error"]
    return set(imported[name]["loaded"])


def test_every_module_imports_in_a_fresh_interpreter(imported):
    assert len(imported) > 100
    failed = {}
    for name, result in imported.items():
        if result["ok"]:
            assert name in result["loaded"]
            continue
        extra = OPTIONAL_AT_IMPORT.get(name)
        if extra is not None and importlib.util.find_spec(extra) is None and "ImportError" in result["error"]:
            continue   # its optional extra is not installed here
        failed[name] = result["error"].strip().splitlines()[-1]
    assert not failed, f"modules that do not import on their own: {failed}"


def test_a_module_loads_only_its_layer_and_the_layers_below(imported):
    upward = {}
    for name, result in imported.items():
        if not result["ok"] or name in KNOWN_VIOLATIONS or name == "nanoopt":
            continue
        above = sorted(m for m in result["loaded"] if m != "nanoopt" and layer(m) > layer(name))
        if above:
            upward[name] = above
    assert not upward, f"imports that go up the layers (module -> modules above it that it loads): {upward}"


def test_the_integer_spec_is_a_leaf(imported):
    assert _loaded(imported, "nanoopt.spec") == {"nanoopt", "nanoopt.spec"}


def test_the_kernels_load_no_autograd_layers_or_technique(imported):
    for name in (n for n in imported if n == "nanoopt.kernels" or n.startswith("nanoopt.kernels.")):
        loaded = _loaded(imported, name)
        assert all(layer(m) <= 1 for m in loaded - {"nanoopt"}), (name, sorted(loaded))
        assert not loaded & {"nanoopt.nn", "nanoopt.tensor", "nanoopt.ops", "nanoopt.quant", "nanoopt.prune",
                             "nanoopt.distill"}


def test_the_autograd_loads_no_integer_kernel(imported):
    for name in ("nanoopt.tensor", "nanoopt.ops"):
        loaded = _loaded(imported, name)
        assert not loaded & INTEGER_KERNELS, (name, sorted(loaded & INTEGER_KERNELS))


def test_the_runtime_loads_no_autograd(imported):
    for name in (n for n in imported if n == "nanoopt.runtime" or n.startswith("nanoopt.runtime.")):
        loaded = _loaded(imported, name)
        assert all(layer(m) <= 2 for m in loaded - {"nanoopt"}), (name, sorted(m for m in loaded if layer(m) > 2))
        assert not loaded & {"nanoopt.tensor", "nanoopt.ops", "nanoopt.nn"}


def test_the_layers_load_no_technique(imported):
    techniques = ("nanoopt.quant", "nanoopt.prune", "nanoopt.distill", "nanoopt.layerwise")
    for name in ("nanoopt.nn", "nanoopt.models", "nanoopt.models_gpt", "nanoopt.train", "nanoopt.train_lm",
                 "nanoopt.data", "nanoopt.optim"):
        loaded = _loaded(imported, name)
        assert not [m for m in loaded if m.startswith(techniques)], name


def test_no_technique_loads_the_face(imported):
    face = {m for m in imported if GRAPH.component(m)[0] == "face"}
    for name in imported:
        if GRAPH.component(name)[1] == 5 and name not in KNOWN_VIOLATIONS:
            assert not _loaded(imported, name) & face, name


def test_quant_has_no_lazy_attribute_hooks():
    import nanoopt.quant
    import nanoopt.quant.algorithms

    for package in (nanoopt.quant, nanoopt.quant.algorithms):
        assert not hasattr(package, "__getattr__") and not hasattr(package, "_LAZY"), package.__name__
