"""Pruning masks against PyTorch's ``torch.nn.utils.prune`` itself, on the same tensors (optional extra ``torch``).

Each test builds two twins holding the same weight, one a nanoopt module and one a torch module, applies the same
sequence of pruning calls to both and compares the masks. Compositions go through PyTorch's ``PruningContainer``
(an l1 after an ln_structured ranks the survivors; an ln_structured after an l1 ranks the channels that still have
a survivor, by the norm of the *masked* weight or of the raw ``importance_scores``).

What cannot be compared entry for entry, and what is compared instead:

* ties. ``torch.topk`` does not specify which of equal values it returns (on this CPU, pruning 3 of
  ``[1, 2, 1, 2, 1, 2, 1, 2, 0.5, 1]`` zeroes indices 8, 4 and 6: neither the first nor the last of the ones);
  nanoopt breaks ties by the lower flat index (documented in :mod:`nanoopt.prune.methods`). Where the draws have
  ties, the tests assert that both prune the same number of entries/slices and the same multiset of magnitudes
  /norms, and that each pruned one is no larger than any kept one. Weights drawn with distinct magnitudes must
  give identical masks.
* ``random_structured``: PyTorch draws ``torch.rand``, nanoopt NumPy's generator, so the channels differ. The
  structural properties are compared exactly instead: the number of slices each prunes, that only whole alive
  slices go, and that nothing else in the mask changes; and nanoopt's choice is uniform over the alive slices.
* N:M: ``torch.nn.utils.prune`` has no N:M method. It is written here as a ``BasePruningMethod`` with
  ``torch.topk`` per group, so that its composition with PyTorch's own methods is still PyTorch's container.
* ``n='fro'`` of ln_structured on a 4-D weight raises inside PyTorch (``matrix_norm`` wants two dims); it is
  compared on 2-D weights, where it is the L2 norm.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nanoopt import nn, prune

torch = pytest.importorskip("torch", reason="comparing with torch.nn.utils.prune needs the optional extra `torch` "
                                            "(pip install -e '.[torch]')")
tprune = pytest.importorskip("torch.nn.utils.prune")

SETTINGS = settings(max_examples=60, deadline=None)
NORMS = [1, 2, 3, 0.5, math.inf, -math.inf]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------- twins and draws
def twins(weights):
    """A nanoopt module and a torch module holding the same parameters ``weight0``, ``weight1``, ..."""
    ours, theirs = nn.Module(), torch.nn.Module()
    for index, weight in enumerate(weights):
        ours.register_parameter(f"weight{index}", nn.Parameter(weight.copy()))
        theirs.register_parameter(f"weight{index}", torch.nn.Parameter(torch.from_numpy(weight.copy())))
    return ours, theirs


def our_mask(module, name):
    return np.asarray(prune.get_mask(module, name), dtype=np.float32)


def their_mask(module, name):
    mask = getattr(module, name + "_mask", None)
    return np.ones(tuple(getattr(module, name).shape), np.float32) if mask is None else mask.detach().numpy()


@st.composite
def shapes(draw):
    """2-D (Linear-like) or 4-D (Conv-like) shapes whose dim 1 is a multiple of 4 (for N:M)."""
    if draw(st.booleans()):
        return (draw(st.integers(1, 7)), draw(st.sampled_from([4, 8, 12])))
    return (draw(st.integers(1, 5)), draw(st.sampled_from([4, 8])), draw(st.integers(1, 2)), draw(st.integers(1, 2)))


@st.composite
def distinct_weights(draw, shape, count=1):
    """``count`` float32 arrays of ``shape`` whose magnitudes are all different (no ties anywhere), both signs."""
    size = int(np.prod(shape))
    magnitudes = draw(arrays(np.float32, size * count, elements=st.floats(0.0009765625, 1024.0, width=32), unique=True))
    negative = draw(arrays(np.bool_, size * count))
    values = np.where(negative, -magnitudes, magnitudes).astype(np.float32)
    return [values[i * size:(i + 1) * size].reshape(shape) for i in range(count)]


def twins_and_scores(data):
    """A drawn shape, twins holding one weight of that shape as ``weight0``, and importance scores for it (weight
    and scores with no ties in magnitude)."""
    shape = data.draw(shapes())
    weight, scores = data.draw(distinct_weights(shape, count=2))
    return (shape, *twins([weight]), scores)


@st.composite
def tied_weights(draw, shape):
    values = draw(st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0]), min_size=int(np.prod(shape)),
                           max_size=int(np.prod(shape))))
    return np.array(values, np.float32).reshape(shape)


def amount(draw, candidates):
    """A float fraction or an int count of ``candidates`` (both PyTorch's conventions)."""
    if draw(st.booleans()):
        return draw(st.floats(0.0, 1.0))
    return draw(st.integers(0, candidates))


def alive_slices(mask, dim):
    return int((np.moveaxis(mask, dim, 0).reshape(mask.shape[dim], -1).sum(axis=1) > 0).sum())


def slice_norms(values, n, dim):
    rows = np.moveaxis(values.astype(np.float64), dim, 0).reshape(values.shape[dim], -1)
    return np.linalg.norm(rows, ord=2 if n == "fro" else n, axis=1)


# ----------------------------------------------------------------- N:M as a torch pruning method
class TorchNM(tprune.BasePruningMethod):
    """Keep the n largest |w| of every m consecutive surviving entries along ``dim`` (``torch.topk`` per group).

    PRUNING_TYPE "global": inside PyTorch's container the method sees the whole tensor and the previous mask.
    """

    PRUNING_TYPE = "global"

    def __init__(self, n, m, dim):
        self.n, self.m, self.dim = n, m, dim

    def compute_mask(self, t, default_mask):
        scores = torch.where(default_mask > 0, t.abs(), torch.tensor(-math.inf, dtype=t.dtype))
        moved = scores.movedim(self.dim, -1)
        groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // self.m, self.m)
        keep = torch.zeros_like(groups).scatter_(-1, torch.topk(groups, self.n, dim=-1).indices, 1.0)
        return keep.reshape(moved.shape).movedim(-1, self.dim) * default_mask


# ----------------------------------------------------------------- one step on both twins
def structured_same_choice(ours, theirs, before, norms, dim):
    """Two structured masks made the same choice up to ties: same slices or same multiset of norms pruned.

    ``norms``: float64 norms of every slice as ranked. Each pruned slice's norm is <= every kept alive slice's.
    """
    if np.array_equal(ours, theirs):
        return
    pruned = {}
    for label, mask in (("nanoopt", ours), ("torch", theirs)):
        was = np.moveaxis(before, dim, 0).reshape(before.shape[dim], -1).sum(axis=1) > 0
        now = np.moveaxis(mask, dim, 0).reshape(mask.shape[dim], -1).sum(axis=1) > 0
        gone = np.flatnonzero(was & ~now)
        kept = np.flatnonzero(now)
        if gone.size and kept.size:
            assert norms[gone].max() <= norms[kept].min() * (1 + 1e-5) + 1e-30, label
        pruned[label] = np.sort(norms[gone])
    np.testing.assert_allclose(pruned["nanoopt"], pruned["torch"], rtol=1e-5, atol=1e-30)


def step(draw, ours, theirs, name, kind):
    """Apply one pruning call of ``kind`` to both twins; return a note for failure messages."""
    before = our_mask(ours, name)
    np.testing.assert_array_equal(before, their_mask(theirs, name))
    weight = getattr(ours, name).data
    if kind == "l1":
        value = amount(draw, int(before.sum()))
        prune.l1_unstructured(ours, name, amount=value)
        tprune.l1_unstructured(theirs, name, amount=value)
        np.testing.assert_array_equal(our_mask(ours, name), their_mask(theirs, name))
        return f"l1({value})"
    if kind == "ln":
        dim = draw(st.integers(-weight.ndim, weight.ndim - 1))
        n = draw(st.sampled_from(NORMS + (["fro"] if weight.ndim == 2 else [])))
        value = amount(draw, alive_slices(before, dim))
        effective = weight * before                        # what PyTorch ranks: the masked weight
        prune.ln_structured(ours, name, amount=value, n=n, dim=dim)
        tprune.ln_structured(theirs, name, amount=value, n=n, dim=dim)
        ours_after, theirs_after = our_mask(ours, name), their_mask(theirs, name)
        structured_same_choice(ours_after, theirs_after, before, slice_norms(effective, n, dim), dim % weight.ndim)
        if not np.array_equal(ours_after, theirs_after):    # a tie went the other way: continue from torch's
            ours._buffers[name + "_mask"][...] = theirs_after
            prune.masks.set_effective(ours, name)
        return f"ln({value}, n={n}, dim={dim})"
    if kind == "nm":
        m = draw(st.sampled_from([2, 4]))
        n = draw(st.integers(1, m))
        prune.nm_sparsity(ours, name, n=n, m=m, dim=1)
        TorchNM.apply(theirs, name, n=n, m=m, dim=1)
        np.testing.assert_array_equal(our_mask(ours, name), their_mask(theirs, name))
        return f"nm({n}:{m})"
    raise AssertionError(kind)


# ----------------------------------------------------------------- the comparisons
@SETTINGS
@given(st.data())
def test_compositions_of_l1_ln_structured_and_nm_equal_torch(data):
    shape = data.draw(shapes())
    (weight,) = data.draw(distinct_weights(shape))
    ours, theirs = twins([weight])
    kinds = data.draw(st.lists(st.sampled_from(["l1", "ln", "nm"]), min_size=1, max_size=4))
    notes = [step(data.draw, ours, theirs, "weight0", kind) for kind in kinds]
    np.testing.assert_array_equal(our_mask(ours, "weight0"), their_mask(theirs, "weight0"), err_msg=str(notes))
    np.testing.assert_array_equal(ours.weight0.data, theirs.weight0.detach().numpy())


@SETTINGS
@given(st.data())
def test_ln_structured_with_separated_norms_equals_torch_exactly(data):
    """Rows scaled by distinct powers of 3 (entries in [1, 2)): every L_n norm is strictly ordered, no ties."""
    rows, columns = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 6))
    order = np.array(data.draw(st.permutations(range(rows))))
    base = data.draw(arrays(np.float32, (rows, columns), elements=st.floats(1.0, 2.0, exclude_max=True, width=32)))
    weight = (base * (3.0 ** order)[:, None]).astype(np.float32)
    n = data.draw(st.sampled_from(NORMS + ["fro"]))
    value = amount(data.draw, rows)
    ours, theirs = twins([weight])
    prune.ln_structured(ours, "weight0", amount=value, n=n, dim=0)
    tprune.ln_structured(theirs, "weight0", amount=value, n=n, dim=0)
    np.testing.assert_array_equal(our_mask(ours, "weight0"), their_mask(theirs, "weight0"))


@SETTINGS
@given(st.data())
def test_ln_structured_with_importance_scores_after_l1_equals_torch(data):
    """PyTorch ranks the alive channels by the norm of the raw ``importance_scores`` (pruned entries included)."""
    shape, ours, theirs, scores = twins_and_scores(data)
    first = data.draw(st.floats(0.0, 1.0))
    prune.l1_unstructured(ours, "weight0", amount=first)
    tprune.l1_unstructured(theirs, "weight0", amount=first)
    before = our_mask(ours, "weight0")
    dim = data.draw(st.integers(0, len(shape) - 1))
    n = data.draw(st.sampled_from(NORMS))
    value = amount(data.draw, alive_slices(before, dim))
    prune.ln_structured(ours, "weight0", amount=value, n=n, dim=dim, importance_scores=scores)
    tprune.ln_structured(theirs, "weight0", amount=value, n=n, dim=dim, importance_scores=torch.from_numpy(scores))
    structured_same_choice(our_mask(ours, "weight0"), their_mask(theirs, "weight0"), before,
                           slice_norms(scores, n, dim), dim)


@SETTINGS
@given(st.data())
def test_l1_unstructured_with_importance_scores_equals_torch(data):
    _, ours, theirs, scores = twins_and_scores(data)
    for _ in range(data.draw(st.integers(1, 3))):
        value = amount(data.draw, int(our_mask(ours, "weight0").sum()))
        prune.l1_unstructured(ours, "weight0", amount=value, importance_scores=scores)
        tprune.l1_unstructured(theirs, "weight0", amount=value, importance_scores=torch.from_numpy(scores))
        np.testing.assert_array_equal(our_mask(ours, "weight0"), their_mask(theirs, "weight0"))


@SETTINGS
@given(st.data())
def test_global_unstructured_after_local_pruning_equals_torch(data):
    shape = data.draw(shapes())
    count = data.draw(st.integers(1, 3))
    weights = data.draw(distinct_weights(shape, count=count))
    ours, theirs = twins(weights)
    names = [f"weight{i}" for i in range(count)]
    for name in names:                                       # some parameters pruned locally first
        for kind in data.draw(st.lists(st.sampled_from(["l1", "ln", "nm"]), max_size=2)):
            step(data.draw, ours, theirs, name, kind)
    use_scores = data.draw(st.booleans())
    scores = data.draw(distinct_weights(shape, count=count)) if use_scores else None
    for _ in range(data.draw(st.integers(1, 2))):
        value = amount(data.draw, int(sum(our_mask(ours, name).sum() for name in names)))
        prune.global_unstructured([(ours, name) for name in names], amount=value,
                                  importance_scores={(ours, n): s for n, s in zip(names, scores, strict=True)}
                                  if use_scores else None)
        tprune.global_unstructured([(theirs, name) for name in names], pruning_method=tprune.L1Unstructured,
                                   amount=value,
                                   importance_scores={(theirs, n): torch.from_numpy(s)
                                                      for n, s in zip(names, scores, strict=True)}
                                   if use_scores else None)
        for name in names:
            np.testing.assert_array_equal(our_mask(ours, name), their_mask(theirs, name))


@SETTINGS
@given(st.data())
def test_ties_prune_the_same_count_and_the_same_magnitudes_as_torch(data):
    """With many equal |w|, which entries go may differ from torch.topk's pick; how many and which values may not."""
    shape = data.draw(shapes())
    weight = data.draw(tied_weights(shape))
    ours, theirs = twins([weight])
    for _ in range(data.draw(st.integers(1, 3))):
        before = our_mask(ours, "weight0")
        value = amount(data.draw, int(before.sum()))
        prune.l1_unstructured(ours, "weight0", amount=value)
        tprune.l1_unstructured(theirs, "weight0", amount=value)
        mine, torchs = our_mask(ours, "weight0"), their_mask(theirs, "weight0")
        magnitudes = np.abs(weight)
        gone_ours = (before > 0) & (mine == 0)
        gone_torch = (before > 0) & (torchs == 0)
        assert gone_ours.sum() == gone_torch.sum()
        np.testing.assert_array_equal(np.sort(magnitudes[gone_ours]), np.sort(magnitudes[gone_torch]))
        if gone_ours.any() and mine.any():
            assert magnitudes[gone_ours].max() <= magnitudes[mine > 0].min()
        ours._buffers["weight0_mask"][...] = torchs          # continue from the same state
        prune.masks.set_effective(ours, "weight0")


def test_nanoopt_breaks_ties_by_the_lower_index_where_torch_topk_picks_by_its_algorithm():
    weight = np.array([[1.0, 2, 1, 2, 1, 2, 1, 2, 0.5, 1]], np.float32)
    ours, theirs = twins([weight])
    prune.l1_unstructured(ours, "weight0", amount=3)
    tprune.l1_unstructured(theirs, "weight0", amount=3)
    assert np.flatnonzero(our_mask(ours, "weight0") == 0).tolist() == [0, 2, 8]    # 0.5, then the first two 1s
    torch_pruned = np.flatnonzero(their_mask(theirs, "weight0") == 0)
    assert 8 in torch_pruned and np.all(np.abs(weight.ravel()[torch_pruned]) <= 1.0)


@SETTINGS
@given(st.data(), st.integers(0, 2**31 - 1))
def test_random_structured_has_torchs_structure(data, seed):
    """Not the same channels (different generators); the same counts, whole alive slices, nothing else changed."""
    shape = data.draw(shapes())
    (weight,) = data.draw(distinct_weights(shape))
    ours, theirs = twins([weight])
    torch.manual_seed(seed)
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            step(data.draw, ours, theirs, "weight0", "l1")
        before = our_mask(ours, "weight0")
        dim = data.draw(st.integers(0, len(shape) - 1))
        alive = alive_slices(before, dim)
        value = amount(data.draw, alive)
        prune.random_structured(ours, "weight0", amount=value, dim=dim, seed=seed)
        tprune.random_structured(theirs, "weight0", amount=value, dim=dim)
        expected = alive - (value if isinstance(value, int) else round(value * alive))
        for mask in (our_mask(ours, "weight0"), their_mask(theirs, "weight0")):
            assert alive_slices(mask, dim) == expected
            slices_before = np.moveaxis(before, dim, 0).reshape(shape[dim], -1)
            slices_after = np.moveaxis(mask, dim, 0).reshape(shape[dim], -1)
            for index in range(shape[dim]):
                if slices_after[index].any() or not slices_before[index].any():
                    np.testing.assert_array_equal(slices_after[index], slices_before[index])
        ours._buffers["weight0_mask"][...] = their_mask(theirs, "weight0")     # continue from the same state
        prune.masks.set_effective(ours, "weight0")
        seed += 1


def test_random_structured_picks_uniformly_among_alive_slices_as_torch_does():
    """Row 0 has one survivor, row 1 all 16: each is pruned with probability 1/2, whatever its survivors.

    2,000 seeded draws: the count of row-0 prunings is Binomial(2000, 1/2), sd 22.4; 1,000 +- 120 is > 5 sd.
    """
    mask = np.zeros((2, 16), np.float32)
    mask[0, 0] = 1.0
    mask[1] = 1.0
    row0 = 0
    for seed in range(2000):
        layer = prune.custom_from_mask(nn.Linear(16, 2), "weight", mask)
        prune.random_structured(layer, "weight", amount=1, dim=0, seed=seed)
        row0 += int(layer.weight_mask[0].sum() == 0)
    assert abs(row0 - 1000) <= 120
