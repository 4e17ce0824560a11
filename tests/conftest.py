"""Checks on the tests themselves: a test that trains must carry ``@pytest.mark.slow``.

"Trains" means: ``nanoopt.fit`` (directly, or through a Distiller, a pruning schedule, QAT ...) drew a second
batch, i.e. took an optimiser step and went on. A test that only checks that ``fit`` refuses bad input before or at
its first batch is not training. Module-scoped fixtures run before this check and are not seen by it; tests that
use a training fixture are marked by hand.
"""

import pytest

from nanoopt import train


class _CountingBatches:
    """Wraps the loader ``fit`` iterates (once per epoch) and counts the batches drawn."""

    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def __iter__(self):
        for batch in self.inner:
            self.counter[0] += 1
            yield batch

    def __len__(self):
        return len(self.inner)


@pytest.fixture(autouse=True)
def training_tests_are_marked_slow(request, monkeypatch):
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    counter = [0]
    original = train._loader

    def counting_loader(*args, **kwargs):  # only fit's loader trains; evaluate shares the function (where="evaluate")
        batches = original(*args, **kwargs)
        return _CountingBatches(batches, counter) if kwargs.get("where", "fit") == "fit" else batches

    monkeypatch.setattr(train, "_loader", counting_loader)
    yield
    assert counter[0] <= 1, (f"{request.node.nodeid} trains ({counter[0]} batches through nanoopt.fit) but is not "
                             "marked @pytest.mark.slow")
