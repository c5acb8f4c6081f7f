"""The recipes in examples/ load as they are, say where they come from and what they should reach."""

import pytest
from helpers import ROOT

from hnmix.config import PretrainConfig
from hnmix.core.settings import load_config

RECIPES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_cites_its_source(recipe):
    cfg = load_config(PretrainConfig, recipe)
    header = recipe.read_text().split("\n\n")[0]
    if recipe.stem != "demo":
        assert "# Source:" in header and "# Expected:" in header and "# Run" in header
        assert cfg.epochs >= 200


def test_cifar_recipes_share_the_demo_budget_and_differ_in_the_method():
    cifar = {p.stem: load_config(PretrainConfig, p) for p in RECIPES if p.stem.startswith("cifar10-")}
    assert set(cifar) == {"cifar10-mocov2", "cifar10-mochi", "cifar10-synco", "cifar10-ring"}
    budgets = {(c.epochs, c.batch_size, c.lr, c.queue_size, c.temperature, c.augment.preset) for c in cifar.values()}
    assert budgets == {(200, 512, 0.03, 4096, 0.1, "cifar")}
    assert {c.method for c in cifar.values()} == {"moco", "mochi", "synco", "ring"}
