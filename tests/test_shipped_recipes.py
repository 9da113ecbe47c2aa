"""Every recipe in recipes/ validates and fits the model it names."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_fits_its_model(path, monkeypatch):
    from quota_export import models
    from quota_export.recipe import load_recipe

    monkeypatch.chdir(ROOT)  # model paths in shipped recipes are relative to the repo root
    r = load_recipe(path)
    adapter = models.load(r.model)
    spec = adapter.decoder_spec()
    r.check_against(spec.num_layers, adapter.n_visual(), adapter.module_names())
    assert r.mean_keep_fraction(spec.num_layers) <= r.pruning.budget + 1e-9


def test_default_recipe_exists():
    assert (ROOT / "recipes" / "default.yaml").is_file()
