"""The zoo tests' shared fixture: a small zoo tokenizer, built once a session."""

import pytest


@pytest.fixture(scope="session")
def zoo_tok():
    from rh_lens.zoo.training.tokenizer import build_tokenizer

    return build_tokenizer(vocab_size=512, n_chars=20_000)
