"""The example recipes are valid recipes (checked whole, without running them: the Deep Compression one trains
for minutes; its measured numbers are in its report)."""

import tomllib
from pathlib import Path

import pytest

from nanoopt import data
from nanoopt.pipeline import Recipe

FOLDER = Path(__file__).resolve().parents[2] / "examples" / "recipes"
RECIPES = sorted([*FOLDER.glob("*.toml"), *FOLDER.glob("*.json")])


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_example_recipe_is_valid(path):
    if "fashion-mnist" in path.read_text() and not data.fashion_mnist_available():
        pytest.skip("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist, "
                    "/usr/share/datasets/fashion-mnist)")
    recipe = Recipe.from_file(path)
    assert recipe.steps[-1].kind == "save"


def test_the_deep_compression_recipe_is_the_issue_flow():
    table = tomllib.loads((FOLDER / "deep_compression_lenet300.toml").read_text())
    recipe = Recipe.from_dict({**table, "data": {"dataset": "digits"}})
    assert [step.kind for step in recipe.steps] == ["train", "prune", "qat", "convert", "save"]
    prune, qat = recipe.steps[1].params, recipe.steps[2].params
    assert prune.distill and qat.distill and qat.bits == 4 and recipe.steps[-1].params.format == "compact"
