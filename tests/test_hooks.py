"""Hook names and the last-query argmax recorder."""

import pytest
import torch

from rh_lens import hooks


def test_last_query_argmax_equals_full_pattern(tiny_gqa, clean):
    tokens, base = clean
    rec = hooks.LastQueryArgmax(tiny_gqa.cfg.n_layers)
    with torch.no_grad(), tiny_gqa.hooks(fwd_hooks=rec.hooks):
        tiny_gqa(tokens)
    expected = torch.stack(
        [base[hooks.pattern(layer)][:, :, -1].argmax(-1) for layer in range(2)], dim=1
    )
    assert torch.equal(rec.table(), expected)
    with pytest.raises(RuntimeError, match="run a forward"):
        hooks.LastQueryArgmax(3).table()


def test_input_hook_names_are_the_models_inside_receiver_mode(tiny_gqa):
    from rh_lens.patching import Receiver, receiver_mode

    names = [hooks.q_input(1), hooks.k_input(1), hooks.v_input(1), hooks.mlp_in(0)]
    with receiver_mode(tiny_gqa, [Receiver("q", 1, 0), Receiver("mlp", 0)]):
        assert set(names) <= set(tiny_gqa.hook_dict)
    assert set(hooks.required_hook_names(2)) <= set(tiny_gqa.hook_dict)
