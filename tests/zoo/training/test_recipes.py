"""Recipes refuse impossible stages and people counts."""

import pytest


@pytest.mark.parametrize("kw", [dict(late=1.5), dict(early=-0.1), dict(early=0.6, late=0.6),
                                dict(procedural=2.0), dict(people=()), dict(people=(1, 3))])
def test_a_stage_refuses_shares_outside_0_1_and_people_outside_2_6(kw):
    from rh_lens.zoo.training.recipes import Polish

    with pytest.raises(ValueError, match="Polish"):
        Polish(steps=1, **kw)


def test_a_recipe_refuses_people_outside_2_6():
    import dataclasses

    from rh_lens.zoo.training.recipes import get_recipe

    with pytest.raises(ValueError, match="Recipe.people"):
        dataclasses.replace(get_recipe("micro"), people=(2, 7))
