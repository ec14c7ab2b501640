"""The zoo's seeded prose."""

from rh_lens.zoo.prose import Prose, corpus


def test_prose_is_deterministic_per_seed():
    assert corpus(seed=3, n_chars=3000) == corpus(seed=3, n_chars=3000)
    assert corpus(seed=3, n_chars=3000) != corpus(seed=4, n_chars=3000)
    text = Prose(7).text(n_chars=500)
    assert len(text) >= 500 and text.rstrip()[-1] in '.!?"'
