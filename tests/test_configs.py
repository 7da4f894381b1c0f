"""The example recipes in configs/ are valid, and one runs end to end with local models."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_same_tensors, lm_cocktail_state_dict, load_state_dict, weight_files
from merge_hooks.cli import main
from merge_hooks.pipeline import load_examples
from merge_hooks.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_one_example_per_model_type_and_method():
    combos = {(r.model_type, r.method) for r in map(load_recipe, RECIPES)}
    for model_type in ("encoder", "reranker", "decoder"):
        for method in ("mix_models", "mix_models_by_layers", "mix_models_with_data"):
            if (model_type, method) == ("reranker", "mix_models_with_data"):
                continue  # LM_Cocktail supports it for encoders and decoders only
            assert (model_type, method) in combos, f"no example for {model_type} {method}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_example_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.output.path is not None
    if recipe.examples is not None:
        examples = load_examples(CONFIGS.parent / recipe.examples, recipe.model_type, neg_number=recipe.neg_number)
        assert len(examples) >= 2


def test_example_recipe_with_bin_flag_end_to_end(make_models, tmp_path):
    from sentence_transformers import SentenceTransformer

    paths = make_models("bert-encoder", 2, pooling="cls")
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as done:
        main(["merge", str(CONFIGS / "encoder-mix_models.yaml"), "--save-format", "bin", "-q",
              "--models", *map(str, paths), "--weights", "0.6", "0.4", "--output", str(out)])
    assert done.value.code == 0
    assert weight_files(out) == ["pytorch_model.bin"]
    expected = lm_cocktail_state_dict("mix_models", paths, "encoder", [0.6, 0.4])
    assert_same_tensors(load_state_dict(out, "encoder"), expected)
    st = SentenceTransformer(str(out), device="cpu")
    assert_same_tensors(st[0].auto_model.state_dict(), expected)
    assert st.encode(["paris is the capital of france"]).shape == (1, 32)
