"""Training batches: the copy warm-up, stages' mixes and needle placement, people, hop forms,
roles and lookup rows."""

import pytest
import torch


def test_copy_warmup_batches_repeat_random_spans_and_only_the_repeat_counts(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import get_recipe

    recipe = dataclasses.replace(get_recipe("micro"), copy_warmup=3, copy_batch=5)
    main, param = make_batches(recipe, 2, zoo_tok)
    assert param is None and main.tokens.shape[0] == 5
    for row, answer, lm in zip(main.tokens, main.answer_mask, main.lm_mask, strict=True):
        n = int(answer.sum())
        assert torch.equal(answer, lm) and 8 <= n <= 32
        assert row[0] == zoo_tok.bos_token_id
        assert torch.equal(row[1 : 1 + n], row[1 + n : 1 + 2 * n])
        assert not answer[:n].any() and answer[n : 2 * n].all()  # predicts tokens n+1 .. 2n
    main2, param2 = make_batches(recipe, 3, zoo_tok)  # after the warm-up: the full mix
    assert param2 is not None and main2.tokens.shape[0] == recipe.batch
    assert torch.equal(make_batches(recipe, 2, zoo_tok)[0].tokens, main.tokens)


def test_the_polish_stage_has_its_own_rate_and_batches(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe
    from rh_lens.zoo.training.train import lr_at

    base = dataclasses.replace(get_recipe("micro"), finetune_steps=2, polish=None)
    r = dataclasses.replace(base, polish=Polish(steps=3, lr=1e-4, mix=Mix(1.0, 0.0, 0.0, 0.0)))
    assert r.polish_start == base.total_steps == 6 and r.total_steps == 9
    assert lr_at(r, r.polish_start - 1) == r.finetune_lr and lr_at(r, r.total_steps - 1) == 1e-4
    assert "polish" not in base.to_json() and r.to_json()["polish"]["steps"] == 3
    assert all(lr_at(r, s) == lr_at(base, s) for s in range(r.polish_start))
    assert all(torch.equal(make_batches(r, s, zoo_tok)[0].tokens,
                           make_batches(base, s, zoo_tok)[0].tokens) for s in range(2, 6))
    polished = make_batches(r, r.polish_start, zoo_tok)[0]
    assert torch.equal(polished.tokens, make_batches(r, r.polish_start, zoo_tok)[0].tokens)
    assert not torch.equal(polished.tokens, make_batches(base, r.polish_start, zoo_tok)[0].tokens)


def _needle_share_and_length(batch, pad_id, *, last: bool = False):
    """Per row: where the answer first occurs (with ``last``, last before the target: prose may
    hold its first words by chance), as a share of the row, and the row's length."""
    out = []
    for ids, ans in zip(batch.tokens.tolist(), batch.answer_mask.tolist(), strict=True):
        n = sum(t != pad_id for t in ids)  # rows are right-padded
        target = ans.index(True) + 1
        answer = [ids[i + 1] for i, a in enumerate(ans) if a][:3]
        hits = [i for i in range(target) if ids[i:i + len(answer)] == answer]
        out.append(((hits[-1] if last else hits[0]) / n, n))
    return out


def test_an_early_stage_puts_needles_first_in_the_longest_haystacks(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe

    base = dataclasses.replace(get_recipe("micro"), batch=12, n_ctx=512, polish=None)
    niah = Mix(1.0, 0.0, 0.0, 0.0)
    plain = dataclasses.replace(base, polish=Polish(steps=2, mix=niah))
    early = dataclasses.replace(base, polish=Polish(steps=2, mix=niah, early=1.0))
    assert "early" not in plain.to_json()["polish"] and early.to_json()["polish"]["early"] == 1.0
    pad = zoo_tok.pad_token_id
    for step in (early.polish_start, early.polish_start + 1):
        far = _needle_share_and_length(make_batches(early, step, zoo_tok)[0], pad)
        anywhere = _needle_share_and_length(make_batches(plain, step, zoo_tok)[0], pad)
        assert all(share < 0.3 and n > 0.8 * base.n_ctx for share, n in far), far
        assert max(share for share, _ in anywhere) > 0.5
        assert min(n for _, n in anywhere) < 0.8 * base.n_ctx


def test_a_late_stage_puts_needles_last_and_shares_its_draw_with_early(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe

    # Haystacks of 400-448 tokens in rows of at most 512: a needle in the haystack's last fifth
    # starts past half the row, one in its first fifth before a third of it.
    base = dataclasses.replace(get_recipe("micro"), batch=12, n_ctx=512, min_haystack=400,
                               polish=None)
    niah = Mix(1.0, 0.0, 0.0, 0.0)
    plain = dataclasses.replace(base, polish=Polish(steps=2, mix=niah))
    late = dataclasses.replace(base, polish=Polish(steps=2, mix=niah, late=1.0))
    both = dataclasses.replace(base, polish=Polish(steps=2, mix=niah, early=0.5, late=0.5))
    assert "late" not in plain.to_json()["polish"] and late.to_json()["polish"]["late"] == 1.0
    pad = zoo_tok.pad_token_id
    shares = {"plain": [], "late": [], "both": []}
    for step in (late.polish_start, late.polish_start + 1):
        for key, r in (("plain", plain), ("late", late), ("both", both)):
            shares[key] += [sh for sh, _ in _needle_share_and_length(
                make_batches(r, step, zoo_tok)[0], pad, last=key == "late")]
    assert min(shares["late"]) > 0.5, shares["late"]
    assert min(shares["plain"]) < 0.3 and max(shares["plain"]) > 0.5
    assert all(sh < 0.3 or sh > 0.5 for sh in shares["both"]), shares["both"]
    assert 6 <= sum(sh > 0.5 for sh in shares["both"]) <= 18


def test_a_recipe_and_its_stages_set_how_many_people_a_multi_hop_row_has(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe

    hops = Mix(0.0, 1.0, 0.0, 0.0)
    base = dataclasses.replace(get_recipe("micro"), batch=6, n_ctx=512, mix=hops, polish=None)
    plain = dataclasses.replace(base, polish=Polish(steps=2, mix=hops))
    five = dataclasses.replace(base, polish=Polish(steps=2, mix=hops, people=(5,)))
    four = dataclasses.replace(plain, people=(4,))  # its polish inherits the recipe's
    assert "people" not in plain.to_json() and "people" not in plain.to_json()["polish"]
    assert five.to_json()["polish"]["people"] == [5]  # a list, as JSON reads it back
    assert four.to_json()["people"] == [4] and "people" not in four.to_json()["polish"]

    def counts(recipe, start):
        out = []
        for step in (start, start + 1):
            for row in make_batches(recipe, step, zoo_tok)[0].tokens:
                text = zoo_tok.decode(row, skip_special_tokens=True)
                out.append(text.split("Based on the content")[0].count(" lives in "))
        return out

    assert set(counts(five, five.polish_start)) == {5}
    assert set(counts(five, base.copy_warmup)) == {2, 3}  # the main stage keeps the default
    assert set(counts(plain, plain.polish_start)) == {2, 3}
    assert set(counts(four, base.copy_warmup)) == set(counts(four, four.polish_start)) == {4}


def test_a_recipes_hop_form_rewrites_its_multi_hop_rows_and_nothing_else(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, get_recipe

    base = dataclasses.replace(get_recipe("micro"), batch=12, n_ctx=512,
                               mix=Mix(0.4, 0.3, 0.1, 0.1, 0.1))
    at = dataclasses.replace(base, hop_form="at")
    assert "hop_form" not in base.to_json() and at.to_json()["hop_form"] == "at"
    kinds = {"multihop": 0, "lookup": 0, "other": 0}
    for step in (base.copy_warmup, base.copy_warmup + 1):
        rows = [[zoo_tok.decode(r, skip_special_tokens=True) for r in make_batches(rec, step,
                                                                                  zoo_tok)[0].tokens]
                for rec in (base, at)]
        for lives, there in zip(*rows, strict=True):
            if "Who is the" in lives or "Where do" in lives:
                kinds["multihop" if "Who is the" in lives else "lookup"] += 1
                assert " lives in " in lives and " lives in " not in there
                assert there.split("Answer:")[0].split("Question: ")[1] == \
                    lives.split("Answer:")[0].split("Question: ")[1]  # the same question
            else:
                kinds["other"] += 1
                assert there == lives
        assert make_batches(at, step, zoo_tok)[1].tokens.equal(
            make_batches(base, step, zoo_tok)[1].tokens)  # parametric rows
    assert min(kinds.values()) > 0, kinds
    with pytest.raises(ValueError, match="Recipe.hop_form is one of lives, at, got 'home'"):
        dataclasses.replace(base, hop_form="home")


def test_a_recipes_roles_set_the_officials_of_each_town_in_its_multi_hop_rows(zoo_tok):
    import dataclasses
    import re

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, get_recipe

    base = dataclasses.replace(get_recipe("micro"), batch=6, n_ctx=512, polish=None,
                               mix=Mix(0.0, 1.0, 0.0, 0.0), people=(3,))
    one = dataclasses.replace(base, roles=1)
    assert "roles" not in base.to_json() and one.to_json()["roles"] == 1

    def officials(recipe):
        rows = make_batches(recipe, base.copy_warmup, zoo_tok)[0].tokens
        return {len(re.findall(r"The \w+ of \w+ is", zoo_tok.decode(r).split("Question:")[0]))
                for r in rows}

    assert officials(base) == {6} and officials(one) == {3}
    with pytest.raises(ValueError, match="Recipe.roles is 1 or 2"):
        dataclasses.replace(base, roles=0)


def test_lookup_rows_are_drawn_only_by_a_mix_that_asks_for_them(zoo_tok):
    import dataclasses

    from rh_lens.zoo.training.data import make_batches
    from rh_lens.zoo.training.recipes import Mix, Polish, get_recipe

    base = dataclasses.replace(get_recipe("micro"), batch=6, n_ctx=512, polish=None)
    lookups = dataclasses.replace(base, polish=Polish(steps=2, mix=Mix(0.0, 0.0, 0.0, 0.0, 1.0)))
    assert "lookup" not in base.to_json()["mix"]  # older cards still match
    assert lookups.to_json()["polish"]["mix"]["lookup"] == 1.0

    def questions(recipe, step):
        rows = make_batches(recipe, step, zoo_tok)[0].tokens
        return [zoo_tok.decode(r, skip_special_tokens=True).split("Question: ")[-1][:9]
                for r in rows]

    assert set(questions(lookups, lookups.polish_start)) == {"Where do "}
    assert "Where do " not in questions(lookups, base.copy_warmup)  # the main mix has none
