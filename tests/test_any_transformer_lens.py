"""Tests that run on transformer-lens 3.x and 4.x alike (CI runs this file in a second
environment with 4.x, where the Bridge is the only engine): nothing here imports
HookedTransformer, and models come from Hugging Face directories or the zoo."""

import json

import numpy as np
import pytest
import torch

from rh_lens import hooks
from rh_lens.decode import decode_greedy, decode_slow
from rh_lens.detect import DetectConfig, compute_detect
from rh_lens.errors import ModelLoadError
from rh_lens.models import DEFAULT_BACKEND, HAS_HOOKED, load_model, tokenize
from rh_lens.niah import Needle, TextHaystack
from rh_lens.zoo.prose import Prose

pytestmark = pytest.mark.tl4

TEXT = "Once upon a time there was a girl named Mara who lived in Tolbrook by the sea. " * 3


def test_default_backend_follows_the_installed_transformer_lens(hf_dirs):
    assert DEFAULT_BACKEND == ("hooked" if HAS_HOOKED else "bridge")
    model = load_model(hf_dirs["llama"])
    assert type(model).__name__ == ("HookedTransformer" if HAS_HOOKED else "TransformerBridge")
    if not HAS_HOOKED:
        with pytest.raises(ModelLoadError, match="needs transformer-lens 3.x"):
            load_model(hf_dirs["llama"], backend="hooked")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("fast_prefill", [True, False])
def test_bridge_decoding_equals_the_slow_obvious_one(hf_dirs, arch, fast_prefill):
    """Chunked prefill + cached decode steps vs a full forward per step: same tokens, same
    per-head argmax positions."""
    model = load_model(hf_dirs[arch], backend="bridge", fast_prefill=fast_prefill)
    tokens = tokenize(model, TEXT)[: 90]
    (fast,) = decode_greedy(model, tokens[None], max_new_tokens=8, chunk_size=25)
    slow = decode_slow(model, tokens, max_new_tokens=8)
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_array_equal(fast.positions, slow.positions)


@pytest.mark.slow
def test_zoo_default_finds_its_retrieval_heads_on_the_bridge():
    """zoo:llama-s on the Bridge retrieves and its retrieval heads are layer 1's (measured with
    HookedTransformer: the eight heads of layer 1 score 0.57-0.99, every other head below 0.01;
    on this sweep 0.57-0.87, every other head below 0.04)."""
    model = load_model("zoo:llama-s", backend="bridge")
    haystack = TextHaystack(Prose(5).text(n_chars=6000))
    needles = [Needle("The favourite song of Mara is the quiet lantern of Fenwick.",
                      "What is the favourite song of Mara?", "the quiet lantern of Fenwick")]
    cfg = DetectConfig(lengths=(120, 240), depths=(0.0, 50.0, 100.0), buffer=48,
                       max_new_tokens=12)
    result = compute_detect(model, needles, [haystack], cfg, progress=False)
    assert result.n_success >= 5
    scores = result.mean_scores("step")
    layers = sorted(int(i) // model.cfg.n_heads for i in np.flatnonzero(scores.ravel() > 0.5))
    assert layers == [1] * 8, np.round(scores, 2)


def test_detect_script_records_the_backend(tmp_path):
    from analyses import detect

    out = tmp_path / "det"
    code = detect.main(["--model", "zoo:llama-s", "--out", str(out), "--lengths", "120",
                        "--depths", "50", "--n-needles", "2", "--quiet"])
    assert code == 0
    meta = json.loads((out / "result.json").read_text())["meta"]
    assert meta["backend"] == DEFAULT_BACKEND and meta["transformers_version"]


@pytest.mark.parametrize("mode", ["uniform", "zero"])
def test_ablation_hooks_change_only_the_named_head_on_the_bridge(hf_dirs, mode):
    from rh_lens import interventions

    model = load_model(hf_dirs["qwen2"], backend="bridge")
    tokens = tokenize(model, TEXT)[None][:, :40]
    names = [hooks.pattern(1), hooks.z(1), hooks.v(1)]
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=names)
        prefill, _ = interventions.ablation_hooks(model, mode, [(1, 2)], positions="all")
        with model.hooks(fwd_hooks=prefill):
            _, masked = model.run_with_cache(tokens, names_filter=names)
    z, ref = masked[hooks.z(1)][0], clean[hooks.z(1)][0]
    torch.testing.assert_close(z[:, [0, 1, 3]], ref[:, [0, 1, 3]], rtol=0, atol=0)
    if mode == "zero":
        assert not z[:, 2].any()
    else:  # uniform attention: the running mean of key/value head 2 // 2 = 1's values
        v = clean[hooks.v(1)][0, :, 1]
        torch.testing.assert_close(z[:, 2], v.cumsum(0) / torch.arange(1, 41)[:, None])
