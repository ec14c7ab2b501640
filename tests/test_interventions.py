"""Intervention hooks change exactly what they name, and never stay attached."""

import pytest
import torch

from rh_lens import hooks
from rh_lens.interventions import replace_output_hooks, zero_output_hooks, zero_query_hooks
from tests.conftest import attached_hooks as attached


def test_no_hook_left_attached_after_a_hook_raises(tiny_gqa, clean):
    tokens, _ = clean

    def boom(act, hook):
        raise RuntimeError("boom")

    fwd = zero_query_hooks([(0, 1)]) + [(hooks.pattern(1), boom)]
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_gqa.hooks(fwd_hooks=fwd):
            tiny_gqa(tokens)
    assert attached(tiny_gqa) == 0
    with pytest.raises(RuntimeError, match="boom"):
        tiny_gqa.run_with_hooks(tokens, fwd_hooks=fwd)
    assert attached(tiny_gqa) == 0


def test_zero_query_gives_uniform_attention_for_that_head_only(tiny_gqa, clean):
    tokens, base = clean
    n = tokens.shape[1]
    with torch.no_grad(), tiny_gqa.hooks(fwd_hooks=zero_query_hooks([(1, 2)])):
        _, cache = tiny_gqa.run_with_cache(tokens)
    pat = cache[hooks.pattern(1)][0]
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    torch.testing.assert_close(pat[2], uniform)
    # Every other head, its key/value-group sibling (head 3) included, is untouched.
    for h in (0, 1, 3):
        torch.testing.assert_close(pat[h], base[hooks.pattern(1)][0, h])
    torch.testing.assert_close(cache[hooks.pattern(0)], base[hooks.pattern(0)])
    assert attached(tiny_gqa) == 0


def test_zero_output_only_at_named_positions(tiny_gqa, clean):
    tokens, base = clean
    fwd = zero_output_hooks([(0, 1)], positions=slice(-1, None))
    with torch.no_grad(), tiny_gqa.hooks(fwd_hooks=fwd):
        _, cache = tiny_gqa.run_with_cache(tokens)
    zed, ref = cache[hooks.z(0)][0], base[hooks.z(0)][0]
    assert torch.count_nonzero(zed[-1, 1]) == 0
    torch.testing.assert_close(zed[:-1], ref[:-1])
    torch.testing.assert_close(zed[-1, [0, 2, 3]], ref[-1, [0, 2, 3]])
    resid, resid_ref = cache[hooks.resid_post(1)][0], base[hooks.resid_post(1)][0]
    assert not torch.allclose(resid[-1], resid_ref[-1])
    torch.testing.assert_close(resid[:-1], resid_ref[:-1])


def test_replace_output_patches_from_another_run(tiny_gqa, clean):
    tokens, base = clean
    other = tokens.clone()
    other[0, 3:6] = other[0, 8:11]
    with torch.no_grad():
        _, donor = tiny_gqa.run_with_cache(other)
    source = {0: donor[hooks.z(0)]}
    with torch.no_grad(), tiny_gqa.hooks(fwd_hooks=replace_output_hooks([(0, 2)], source)):
        _, cache = tiny_gqa.run_with_cache(tokens)
    torch.testing.assert_close(cache[hooks.z(0)][0, :, 2], donor[hooks.z(0)][0, :, 2])
    torch.testing.assert_close(cache[hooks.z(0)][0, :, 0], base[hooks.z(0)][0, :, 0])
    assert source[0] is donor[hooks.z(0)]  # the donor activation itself was not modified
