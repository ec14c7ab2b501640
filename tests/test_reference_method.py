"""The reference's decoding method on the Hugging Face model of the same weights: a known-answer
model, the conversion's logits, and equality with rh_lens's detection engine."""

import numpy as np
import pytest
import torch

from rh_lens.decode import decode_greedy, is_stop_token
from rh_lens.hf_export import hooked_from_hf, to_hf
from rh_lens.models import load_model
from rh_lens.niah import Needle, build_trial
from rh_lens.reference_method import (
    greedy_decode,
    greedy_prefill,
    hf_greedy,
    reference_detect,
)
from tests.conftest import BACKENDS
from tests.known_answer import build_copy_model
from tests.test_detect import HAYSTACK, single_token_word


@pytest.fixture(scope="module", params=BACKENDS)
def llama_s(request):
    return load_model("zoo:llama-s", backend=request.param)


def test_converted_model_gives_the_same_logits(llama_s):
    hf = to_hf(llama_s)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, llama_s.cfg.d_vocab, (1, 120), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, llama_s(tokens),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("share", [True, False])
def test_hooked_model_of_hf_weights_gives_the_same_logits(llama_s, share):
    hf = to_hf(llama_s)
    hooked = hooked_from_hf(hf, llama_s.tokenizer, n_ctx=256, share=share)
    up = hf.model.layers[0].mlp.up_proj.weight
    shared = hooked.blocks[0].mlp.W_in.data_ptr() == up.data_ptr()
    assert shared == share
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, llama_s.cfg.d_vocab, (1, 120), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(hooked(tokens), hf(input_ids=tokens).logits,
                                   rtol=1e-4, atol=1e-4)


def test_reference_method_equals_the_engine_on_the_same_weights(llama_s):
    from rh_lens.zoo.inputs import zoo_inputs

    hf = to_hf(llama_s)
    needles, haystacks = zoo_inputs(3, seed=7)
    steps = 0
    for needle, haystack in zip(needles, haystacks, strict=True):
        trial = build_trial(llama_s, needle, haystack, context_length=220, depth=50.0, buffer=50,
                            max_new_tokens=20)
        (ours,) = decode_greedy(llama_s, trial.tokens[None], max_new_tokens=20, chunk_size=64)
        stop = lambda i: is_stop_token(llama_s, i)  # noqa: E731
        ref = reference_detect(hf, trial.tokens[None], max_new_tokens=20, stop=stop,
                               tokenizer=llama_s.tokenizer)
        floor = hf_greedy(hf, trial.tokens[None], max_new_tokens=20, stop=stop)
        np.testing.assert_array_equal(ref.tokens, ours.tokens)
        np.testing.assert_array_equal(ref.positions, ours.positions)
        np.testing.assert_array_equal(floor.tokens, ours.tokens)
        assert ref.text == ours.text
        steps += len(ours.tokens)
    assert steps >= 6  # several steps compared, not one


def test_known_answer_copy_head_looks_at_the_needle(tokenizer):
    word = single_token_word(tokenizer, HAYSTACK.source)
    needle = Needle(f"The magic word is {word}.", "What is the magic word?", word)
    (word_id,) = tokenizer.encode(" " + word, add_special_tokens=False)
    model = build_copy_model(tokenizer, [word_id], copy_head=2)
    trial = build_trial(model, needle, HAYSTACK, context_length=150, depth=50.0, buffer=30,
                        max_new_tokens=5)
    ref = reference_detect(to_hf(model), trial.tokens[None], max_new_tokens=5,
                           stop=lambda i: is_stop_token(model, i), tokenizer=tokenizer)
    needle_at = int((trial.tokens == word_id).nonzero()[0, 0])
    assert ref.text.strip() == word and ref.tokens[0] == word_id
    assert ref.positions[0, 0, 2] == needle_at  # the copy head reads the needle token
    assert (ref.positions[0, 0, [0, 1, 3]] == 0).all()  # uniform heads: first key


def test_fixed_length_decoding_without_a_stop_rule(llama_s):
    hf = to_hf(llama_s)
    prompt = torch.arange(10, 60)[None]
    out = greedy_decode(hf, greedy_prefill(hf, prompt), prompt, max_new_tokens=7)
    assert out.tokens.shape == (7,) and out.positions.shape == (7, 4, 8)


def test_bad_prompts_are_refused(llama_s):
    hf = to_hf(llama_s)
    with pytest.raises(ValueError, match="prompt must be"):
        reference_detect(hf, torch.tensor([[5]]))  # nothing to prefill
    with pytest.raises(ValueError, match="max_new_tokens"):
        hf_greedy(hf, torch.arange(10, 20)[None], max_new_tokens=0)


def test_bridge_without_its_sdpa_twin_is_refused():
    from rh_lens.errors import ModelLoadError

    model = load_model("zoo:llama-s", backend="bridge", fast_prefill=False)
    with pytest.raises(ModelLoadError, match="fast_prefill"):
        to_hf(model)
