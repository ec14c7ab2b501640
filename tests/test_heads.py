"""The head vocabulary: labels, validation, key/value groups, ranking, seeded random draws and
the one head-set spec parser, on hand-made score tables with known answers."""

import numpy as np
import pytest

from rh_lens import heads as H
from rh_lens.heads import Head

# 3 layers x 4 heads; ties at 0.5 (L0H1, L2H0) and at 0.0 (L0H0, L1H1, L2H3).
TABLE = np.array([
    [0.0, 0.5, 0.2, 0.05],
    [0.9, 0.0, 0.3, 0.1],
    [0.5, 0.02, 0.7, 0.0],
])
SHAPE = dict(n_layers=3, n_heads=4)


def test_head_is_a_named_pair_equal_to_a_plain_tuple():
    h = Head(2, 3)
    assert h == (2, 3) and hash(h) == hash((2, 3)) and (2, 3) in {h}
    assert (h.layer, h.head) == (2, 3)
    assert H.label(h) == H.label((2, 3)) == "L2H3"
    assert H.labels([(0, 1), Head(10, 12)]) == ["L0H1", "L10H12"]


def test_validate_heads():
    assert H.validate_heads([(1, 2), (1, 2), [0, 0]], 2, 4) == ((1, 2), (0, 0))
    assert all(type(h) is Head for h in H.validate_heads([(1, 2), (0, 0)], 2, 4))
    with pytest.raises(ValueError, match=r"layer 2 of L2H0 is out of range \[0, 2\): the model "
                                         r"has 2 layers x 4 heads"):
        H.validate_heads([(2, 0)], 2, 4)
    with pytest.raises(ValueError, match="head 4 of L0H4 is out of range"):
        H.validate_heads([(0, 4)], 2, 4)
    with pytest.raises(ValueError, match="pair"):
        H.validate_heads([3], 2, 4)


def test_ranking_top_and_bottom_known_answers():
    assert H.ranked_heads(TABLE)[:4] == [(1, 0, 0.9), (2, 2, 0.7), (0, 1, 0.5), (2, 0, 0.5)]
    assert H.top_heads(TABLE, 4) == ((1, 0), (2, 2), (0, 1), (2, 0))  # tie: layer-major
    assert H.bottom_heads(TABLE, 4) == ((0, 0), (1, 1), (2, 3), (2, 1))  # lowest first
    assert H.bottom_heads(TABLE, 12)[::-1] != H.top_heads(TABLE, 12)  # ties stay layer-major
    assert set(H.bottom_heads(TABLE, 12)) == set(H.top_heads(TABLE, 12))
    with pytest.raises(ValueError, match=r"top-13: K must be in \[1, 12\]"):
        H.top_heads(TABLE, 13)
    with pytest.raises(ValueError, match=r"bottom-0: K must be in \[1, 12\]"):
        H.bottom_heads(TABLE, 0)
    with pytest.raises(ValueError, match="NaN"):
        H.top_heads(np.where(TABLE > 0.8, np.nan, TABLE), 1)


def test_random_draws_are_seeded_sized_nested_and_exclude_retrieval_heads():
    scores = np.zeros((4, 8))
    scores[3, [1, 5]] = [0.9, 0.4]
    scores[2, 0] = 0.1  # not above the threshold: may be drawn
    draw = lambda k, **kw: H.random_head_draws(  # noqa: E731
        k, n_layers=4, n_heads=8, scores=scores, exclude=[(0, 0)], n_draws=5, **kw)
    first = draw(6, seed=3)
    assert first == draw(6, seed=3)
    assert first != draw(6, seed=4)
    assert len(first) == 5 and len(set(first)) > 1
    for heads in first:
        assert len(heads) == len(set(heads)) == 6
        assert not {(3, 1), (3, 5), (0, 0)} & set(heads)
        assert list(heads) == sorted(heads)
    for small, big in zip(draw(2, seed=3), first, strict=True):  # one permutation per draw
        assert set(small) <= set(big)
    assert draw(29, seed=0)  # 32 heads - 2 retrieval - 1 excluded
    with pytest.raises(ValueError, match="random-30 needs 30 heads but only 29"):
        draw(30, seed=0)


def test_random_draws_are_the_first_k_of_each_seeded_permutation():
    """The algorithm, written out: draws stay bit-identical across releases."""
    pool = [(lay, h) for lay in range(3) for h in range(4) if TABLE[lay, h] <= H.THRESHOLD]
    rng = np.random.default_rng(7)
    want = tuple(tuple(sorted(pool[i] for i in rng.permutation(len(pool))[:3]))
                 for _ in range(4))
    assert H.random_head_draws(3, **SHAPE, scores=TABLE, seed=7, n_draws=4) == want
    assert len(pool) == 6  # 0.1 itself is not a retrieval head
    assert H.random_head_draws(2, **SHAPE, seed=0)[0] != ()  # without scores: every head


def test_kv_groups_of_a_gqa_shape():
    # 8 query heads reading 2 key/value groups: heads 0-3 read group 0, heads 4-7 group 1.
    assert [H.kv_group((0, h), 8, 2) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert H.kv_group_heads([(1, 1), (0, 0)], n_layers=2, n_heads=8, n_kv_heads=2) == (
        (1, 4), (1, 5), (1, 6), (1, 7), (0, 0), (0, 1), (0, 2), (0, 3))
    with pytest.raises(ValueError, match="group 2 of L0G2 is out of range .* 2 key/value groups"):
        H.kv_group_heads([(0, 2)], n_layers=2, n_heads=8, n_kv_heads=2)
    with pytest.raises(ValueError, match="n_heads=8 is not divisible by n_kv_heads=3"):
        H.kv_group((0, 0), 8, 3)


def test_group_table():
    table = np.array([[0.0, 0.2, 0.4, 0.8, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.3, 0.3]])
    np.testing.assert_allclose(H.group_table(table, 3), [[0.1, 0.6, 0.5], [1.0, 0.0, 0.3]])
    np.testing.assert_allclose(H.group_table(table, 2, reduce="max"), [[0.4, 1.0], [1.0, 0.3]])
    np.testing.assert_array_equal(H.group_table(table > 0.5, 2, reduce="sum"), [[0, 2], [2, 0]])
    np.testing.assert_array_equal(H.group_table(table > 0.9, 3, reduce="any"),
                                  [[False, False, True], [True, False, False]])
    assert np.array_equal(H.group_table(table, 6), table)
    stacked = np.stack([table, 2 * table])
    assert H.group_table(stacked, 3).shape == (2, 2, 3)
    np.testing.assert_allclose(H.group_table(stacked, 3)[1], 2 * H.group_table(table, 3))
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by n_kv_heads=4"):
        H.group_table(table, 4)


def select(text, **kw):
    return H.select_heads(text, **SHAPE, **{"n_kv_heads": 2, "scores": TABLE, **kw})


def test_specs_resolve_to_known_head_sets():
    assert select("top:2") == (((1, 0), (2, 2)),)
    assert select("bottom:2") == (((0, 0), (1, 1)),)
    assert select("heads:2.1, 0.3,2.1") == (((2, 1), (0, 3)),)  # order written, no duplicates
    assert select("groups:1.1") == (((1, 2), (1, 3)),)
    assert select("all")[0] == tuple((lay, h) for lay in range(3) for h in range(4))
    draws = select("random:2", seed=5, n_draws=3)
    assert draws == H.random_head_draws(2, **SHAPE, scores=TABLE, seed=5, n_draws=3)
    assert all(TABLE[h] <= H.THRESHOLD for d in draws for h in d)
    spec = H.parse_spec("random:3")
    assert (spec.kind, spec.k, spec.needs_scores) == ("random", 3, True)
    assert H.parse_spec("groups:0.1,2.0").items == ((0, 1), (2, 0))


def test_matched_draws_have_the_top_heads_layer_histogram_and_avoid_them():
    # top:4 of TABLE: L1H0, L2H2, L0H1, L2H0 -> one head in layers 0 and 1, two in layer 2.
    for seed in range(20):
        draws = select("matched:4", seed=seed, n_draws=5)
        assert len(draws) == 5
        for draw in draws:
            assert sorted(lay for lay, _ in draw) == [0, 1, 2, 2]
            assert not set(draw) & {(1, 0), (2, 2), (0, 1), (2, 0)}
            assert list(draw) == sorted(draw) and len(set(draw)) == 4
        # layer 2 has only L2H1 and L2H3 left, so every draw holds both
        assert all({(2, 1), (2, 3)} <= set(d) for d in draws)
    assert select("matched:4", seed=3, n_draws=5) == select("matched:4", seed=3, n_draws=5)
    assert len({select("matched:1", seed=s)[0] for s in range(30)}) == 3  # L1H1, L1H2, L1H3


def test_matched_draws_follow_the_documented_permutations():
    rng = np.random.default_rng(11)
    want = []
    for _ in range(3):  # layer by layer: the first c_l of a permutation of the eligible heads
        pools = {0: [0, 2, 3], 1: [1, 2, 3], 2: [1, 3]}
        counts = {0: 1, 1: 1, 2: 2}
        draw = [(lay, pools[lay][i]) for lay in (0, 1, 2)
                for i in rng.permutation(len(pools[lay]))[:counts[lay]]]
        want.append(tuple(sorted(draw)))
    assert select("matched:4", seed=11, n_draws=3) == tuple(want)
    excluded = select("matched:3", seed=0, n_draws=10, exclude=[(0, 0), (0, 2)])
    assert {d[0] for d in excluded} == {(0, 3)}  # layer 0 keeps only L0H3


def test_bottom_k_on_a_hand_made_table():
    table = np.array([[0.4, 0.0, 0.9], [0.0, 0.3, 0.1]])
    assert select_on(table, "bottom:1") == (((0, 1),),)
    assert select_on(table, "bottom:3") == (((0, 1), (1, 0), (1, 2)),)  # tie: layer-major
    assert select_on(table, "bottom:6")[0][-1] == (0, 2)  # the highest comes last


def select_on(table, text):
    return H.select_heads(text, n_layers=table.shape[0], n_heads=table.shape[1], scores=table)


@pytest.mark.parametrize("text, draws, message", [
    ("matched:7", 1, "matched-7: top-7 has 3 heads in layer 1, which leaves only 1 other"),
    ("matched:12", 1, "top-12 has 4 heads in layer 0, which leaves only 0"),
    ("matched:2", 0, "'matched:2': the number of draws must be >= 1, got 0"),
    ("random:2", 0, "'random:2': the number of draws must be >= 1, got 0"),
    ("other:2", 1, "unknown head set 'other:2': use top:K .* matched:K"),
])
def test_bad_draw_requests_give_clear_errors(text, draws, message):
    with pytest.raises(ValueError, match=message):
        select(text, n_draws=draws)
    if draws == 0:
        with pytest.raises(ValueError, match="number of draws must be >= 1"):
            H.matched_head_draws(2, scores=TABLE, n_draws=0)


@pytest.mark.parametrize("text, message", [
    ("middle:3", "unknown head set 'middle:3': use top:K"),
    ("top:0", "write top:K with K a positive integer"),
    ("random:x", "write random:K with K a positive integer"),
    ("bottom:", "write bottom:K"),
    ("heads:", "write heads:L.H"),
    ("heads:1-2", "bad head '1-2' in '1-2': write LAYER.HEAD"),
    ("heads:1.2.3", "bad head '1.2.3'"),
    ("groups:1", "bad group '1' in '1': write LAYER.GROUP"),
    ("all:3", "'all' takes no argument"),
])
def test_bad_specs_give_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        H.parse_spec(text)


@pytest.mark.parametrize("text, message", [
    ("top:13", r"top-13: K must be in \[1, 12\]"),
    ("bottom:20", r"bottom-20: K must be in \[1, 12\]"),
    ("random:7", "random-7 needs 7 heads but only 6"),
    ("heads:3.0", "layer 3 of L3H0 is out of range"),
    ("heads:0.4", r"head 4 of L0H4 is out of range \[0, 4\): the model has 3 layers x 4 heads"),
    ("groups:0.2", "group 2 of L0G2 is out of range"),
])
def test_specs_out_of_the_models_range(text, message):
    with pytest.raises(ValueError, match=message):
        select(text)


def test_specs_that_rank_need_the_models_scores():
    with pytest.raises(ValueError, match="'top:1' needs retrieval scores"):
        H.select_heads("top:1", **SHAPE)
    with pytest.raises(ValueError, match="another model"):
        H.select_heads("random:1", **SHAPE, scores=np.zeros((4, 8)))
    assert H.select_heads("heads:0.0", **SHAPE) == (((0, 0),),)  # explicit heads need none
