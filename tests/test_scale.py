"""Real model shapes with random weights, and the side-by-side benchmark built on them: the
published parameter counts, seeded weights, the memory meter, the engines against the
reference's method on the same weights, and bad input."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from rh_lens import scale
from rh_lens.models import HAS_HOOKED
from rh_lens.shapes import SHAPES, Shape, get_shape, random_model

TINY = Shape("tiny", n_layers=2, d_model=96, n_heads=6, n_kv_heads=2, d_head=16, d_mlp=192,
             d_vocab=300, rope_theta=10000.0, rms_eps=1e-5, context=4096)


@pytest.mark.parametrize(("name", "published"), [
    ("llama-3.1-8b", 8_030_261_248),  # the model cards' parameter counts
    ("llama-2-7b", 6_738_415_616),
    ("mistral-7b", 7_248_023_552),
    ("qwen2.5-7b", 7_615_616_512 - 28 * (3584 + 2 * 512)),  # less the q/k/v biases left out
])
@pytest.mark.tl4
def test_shapes_have_the_published_parameter_counts(name, published):
    assert SHAPES[name].n_params() == published


def test_random_model_has_the_shape_and_is_seeded():
    a = random_model(TINY, n_ctx=64, seed=3)
    b = random_model(TINY, n_ctx=64, seed=3)
    c = random_model(TINY, n_ctx=64, seed=4)
    assert sum(p.numel() for p in a.parameters()) == TINY.n_params()
    same = [torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True)]
    assert all(same)
    w = a.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(w, c.model.layers[1].self_attn.q_proj.weight)
    assert abs(float(w.detach().std()) - 0.02) < 0.002
    assert a.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 96)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="unknown shape 'llama-9'"):
        get_shape("llama-9")
    with pytest.raises(ValueError, match=r"--layers must be in 1\.\.32"):
        get_shape("llama-3.1-8b", layers=33)
    assert get_shape("mistral-7b", layers=2).n_layers == 2


def test_the_memory_meter_sees_a_known_allocation():
    with scale.peak_memory(torch.device("cpu")) as peak:
        block = torch.ones(50 * 2**20)  # 200 MiB, touched
        del block
    assert 195 * 2**20 <= peak.bytes < 240 * 2**20
    with scale.peak_memory(torch.device("cpu")) as again:  # the peak was reset
        small = torch.ones(2**20)
        del small
    assert again.bytes < 40 * 2**20


@pytest.fixture(scope="module")
def tiny_engines():
    return scale.build_engines(TINY, n_ctx=700, seed=1)


@pytest.mark.tl4
def test_engines_and_the_reference_method_agree_on_random_weights(tiny_engines):
    agree = scale.same_answers(tiny_engines, 600, steps=5, chunk=128, seed=2)
    assert agree and all(agree.values()), agree


def test_every_method_is_timed_and_measured(tiny_engines):
    for method in tiny_engines.available():
        m = scale.measure(tiny_engines, method, 300, steps=3, chunk=128)
        assert m.prefill_s > 0 and m.step_s > 0 and not m.out_of_memory
        assert m.predicted_bytes > 0
    with pytest.raises(ValueError, match="context 800 needs"):
        scale.measure(tiny_engines, "greedy", 800, steps=3, chunk=128)
    with pytest.raises(ValueError, match="method 'flash'"):
        scale.measure(tiny_engines, "flash", 300, steps=3, chunk=128)


def test_the_memory_model_grows_as_its_formula_says():
    big = replace(TINY, d_vocab=100_000)
    f32 = torch.float32
    ref = [scale.predicted_bytes(big, "reference", context=c, chunk=256, steps=0, dtype=f32)
           for c in (1000, 2000)]
    # the reference keeps the logits of every position: 4 bytes x vocabulary per token
    assert ref[1] - ref[0] >= 1000 * 100_000 * 4
    ours = [scale.predicted_bytes(big, "bridge", context=c, chunk=256, steps=0, dtype=f32)
            for c in (1000, 2000)]
    assert ours[1] - ours[0] < (ref[1] - ref[0]) / 50
    half = scale.predicted_bytes(big, "greedy", context=1000, chunk=256, steps=0,
                                 dtype=torch.bfloat16)
    assert 2 * half == scale.predicted_bytes(big, "greedy", context=1000, chunk=256, steps=0,
                                             dtype=f32)


def test_the_budget_search_refuses_what_cannot_fit(tiny_engines):
    with pytest.raises(ValueError, match="budget must be positive"):
        scale.find_limit(tiny_engines, "greedy", budget_bytes=0, start=64, steps=2, chunk=64)
    lim = scale.find_limit(tiny_engines, "greedy", budget_bytes=1000, start=64, steps=2,
                           chunk=64)
    assert lim.longest is None and "weights alone" in lim.stopped_by
    lim = scale.find_limit(tiny_engines, "bridge", budget_bytes=2**34, start=128, steps=2,
                           chunk=64, max_context=600)
    assert lim.longest == 512 and [m.context for m in lim.tried] == [128, 256, 512]


@pytest.mark.slow
def test_the_8b_shape_at_two_layers_runs_every_method_with_the_reference_answers(tmp_path):
    from analyses import bench_detect

    out = tmp_path / "bench"
    assert bench_detect.main(["--shape", "llama-3.1-8b", "--layers", "2", "--contexts", "1024",
                              "--steps", "3", "--out", str(out)]) == 0  # 1: answers differ
    saved = json.loads((out / "bench_scale.json").read_text())
    assert saved["complete"] and saved["same_answers"] and all(saved["same_answers"].values())
    engines = set(scale.METHODS) if HAS_HOOKED else {"bridge", "reference", "greedy"}
    assert {m["method"] for m in saved["measurements"]} == engines
    assert saved["shape"]["n_layers"] == 2 and saved["shape"]["d_vocab"] == 128256
    assert all(np.isfinite(m["step_s"]) for m in saved["measurements"])
    assert (out / "bench_scale.html").is_file()
