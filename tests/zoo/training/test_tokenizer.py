"""The zoo's byte-level BPE tokenizer."""


def test_tokenizer_round_trips_any_text_and_works_in_transformer_lens(zoo_tok):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    text = "Zürich — naïve café! Based on the content of the book, Question: x?\nAnswer: 42"
    ids = zoo_tok(text)["input_ids"]
    assert ids[0] == zoo_tok.bos_token_id and zoo_tok.unk_token_id is None
    assert zoo_tok.decode(ids, skip_special_tokens=True) == text
    offsets = zoo_tok(text, return_offsets_mapping=True)["offset_mapping"]
    assert offsets[0] == (0, 0) and offsets[-1][1] == len(text)
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=64,
                                  d_vocab=len(zoo_tok), act_fn="gelu", normalization_type="LN",
                                  d_mlp=32)
    model = HookedTransformer(cfg, tokenizer=zoo_tok)
    assert model.tokenizer is zoo_tok
    tokens = model.to_tokens(text, truncate=False)
    assert tokens[0, 0].item() == zoo_tok.bos_token_id
    assert model.to_string(tokens[0, 1:]) == text
    assert zoo_tok.pad_token_id not in (zoo_tok.eos_token_id, zoo_tok.bos_token_id)


def test_tokenizer_is_deterministic(zoo_tok):
    from rh_lens.zoo.training.tokenizer import build_tokenizer

    assert build_tokenizer(vocab_size=512, n_chars=20_000).get_vocab() == zoo_tok.get_vocab()
