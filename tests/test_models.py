"""load_model on every source a user has, checked against transformers' own logits."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rh_lens import hooks
from rh_lens.errors import ContextTooLongError, ModelLoadError
from rh_lens.models import (
    forward_chunk,
    load_model,
    model_facts,
    new_kv_state,
    save_model_dir,
    tokenize,
    tokenize_with_offsets,
)
from tests.conftest import build_tiny_gqa, save_hf_model

TEXT = "Once upon a time there was a girl named Mara who lived in Tolbrook by the sea. " * 2


def hf_logits(path, tokens):
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_local_hf_directory_matches_transformers(hf_dirs, arch):
    model = load_model(hf_dirs[arch])
    tokens = tokenize(model, TEXT)[None]
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(ours, hf_logits(hf_dirs[arch], tokens), atol=1e-4, rtol=1e-4)
    facts = model_facts(model)
    assert (facts.n_layers, facts.n_heads) == (2, 4)
    assert facts.n_kv_heads == (4 if arch == "gpt2" else 2)


def test_linear_rope_scaling_is_applied(tmp_path, tokenizer):
    """TL 3.9 maps only llama3 scaling; a linear factor must not load as unscaled."""
    path = save_hf_model(
        tmp_path / "llama-linear", "llama", tokenizer,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    )
    model = load_model(path, n_ctx=1024)
    tokens = tokenize(model, TEXT * 8)[None]
    assert 600 < tokens.shape[1] <= 1024
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(ours, hf_logits(path, tokens), atol=1e-4, rtol=1e-4)


def test_rope_theta_is_honoured(tmp_path, tokenizer):
    path = save_hf_model(tmp_path / "llama-theta", "llama", tokenizer, rope_theta=500000.0)
    model = load_model(path)
    assert model.cfg.rotary_base == 500000.0
    tokens = tokenize(model, TEXT)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_logits(path, tokens), atol=1e-4, rtol=1e-4)


def test_unsupported_rope_scaling_is_refused(tmp_path, tokenizer):
    path = save_hf_model(
        tmp_path / "llama-dyn", "llama", tokenizer,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    with pytest.raises(ModelLoadError, match="rope scaling"):
        load_model(path)


def test_n_ctx_extends_rotary_model_and_matches_transformers(hf_dirs):
    model = load_model(hf_dirs["llama"], n_ctx=600)
    assert model.cfg.n_ctx == 600
    tokens = tokenize(model, TEXT * 6)[None]
    assert tokens.shape[1] > 256  # beyond the checkpoint's max_position_embeddings
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(ours, hf_logits(hf_dirs["llama"], tokens), atol=1e-4, rtol=1e-4)


def test_n_ctx_cannot_extend_learned_positions(hf_dirs):
    with pytest.raises(ModelLoadError, match="only rotary"):
        load_model(hf_dirs["gpt2"], n_ctx=4096)


def test_tokenize_never_truncates_and_context_is_checked(hf_dirs):
    model = load_model(hf_dirs["gpt2"])  # n_ctx 128
    tokens = tokenize(model, TEXT * 10)
    assert tokens.shape[0] > model.cfg.n_ctx
    with pytest.raises(ContextTooLongError, match=r"n_ctx=128"):
        forward_chunk(model, tokens[None], new_kv_state(model))


def test_offsets_locate_text(hf_dirs):
    model = load_model(hf_dirs["llama"])
    text = "The secret ingredient is purple ginger."
    ids, offsets = tokenize_with_offsets(model, text)
    assert ids[0].item() == model.tokenizer.bos_token_id and offsets[0] == (0, 0)
    pieces = "".join(text[a:b] for a, b in offsets[1:])
    assert pieces == text
    assert model.to_string(ids[1:]) == text


def test_chunked_forward_equals_full_forward_even_with_pad_token(tiny_gqa):
    """The KV-cache path must not mask real tokens that share the pad token's id."""
    model = tiny_gqa
    pad = model.tokenizer.pad_token_id
    assert pad is not None
    tokens = tokenize(model, TEXT)[None].clone()
    # TL masks *trailing* pad-id tokens of each chunk (right padding): end chunks with one.
    tokens[0, [6, 13, 20, -1]] = pad
    with torch.no_grad():
        full = model(tokens)
        state = new_kv_state(model)
        parts = [forward_chunk(model, tokens[:, i : i + 7], state)
                 for i in range(0, tokens.shape[1], 7)]
    assert state.n_tokens == tokens.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_save_model_dir_round_trip(tmp_path, tokenizer):
    tiny_gqa = build_tiny_gqa(tokenizer, "hooked")  # the format is HookedTransformer's
    path = save_model_dir(
        tmp_path / "m", cfg=tiny_gqa.cfg, state_dict=tiny_gqa.state_dict(),
        tokenizer=tiny_gqa.tokenizer, card={"note": "test"},
    )
    loaded = load_model(path)
    tokens = tokenize(loaded, TEXT)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), tiny_gqa(tokens))
    assert json.loads((path / "card.json").read_text()) == {"note": "test"}
    longer = load_model(path, n_ctx=512)
    assert longer.cfg.n_ctx == 512


def test_loaded_models_carry_the_hooks_rh_lens_needs(hf_dirs):
    model = load_model(hf_dirs["qwen2"])
    assert set(hooks.required_hook_names(model.cfg.n_layers)) <= set(model.hook_dict)


def test_device_auto_and_dtype(hf_dirs):
    model = load_model(hf_dirs["llama"], device="auto", dtype="bfloat16")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == expected
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(hf_dirs["llama"], dtype="float8")


# ---------------------------------------------------------------------------------- bad input


def test_unknown_spec(monkeypatch):
    with pytest.raises(ModelLoadError, match="unknown model spec 'gtp2'.*gpt2"):
        load_model("gtp2")


def test_missing_directory():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./no/such/model-dir")


def test_unknown_zoo_model():
    with pytest.raises(ModelLoadError, match="unknown zoo model 'nope'"):
        load_model("zoo:nope")


def test_named_model_fails_fast_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*OFFLINE"):
        load_model("gpt2")


def test_named_model_fails_fast_when_hub_unreachable(monkeypatch, tmp_path):
    import socket

    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        load_model("gpt2")


def copy_without(src, dst, *names):
    shutil.copytree(src, dst)
    for name in names:
        (dst / name).unlink()
    return dst


def test_directory_without_tokenizer(tmp_path, hf_dirs):
    path = copy_without(hf_dirs["llama"], tmp_path / "m", "tokenizer.json",
                        "tokenizer_config.json")
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        load_model(path)


def test_directory_without_config_or_weights(tmp_path, hf_dirs):
    path = copy_without(hf_dirs["llama"], tmp_path / "a", "config.json")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(path)
    path = copy_without(hf_dirs["llama"], tmp_path / "b", "model.safetensors")
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_model(path)


def test_unsupported_architecture(tmp_path, hf_dirs):
    path = copy_without(hf_dirs["llama"], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="architecture 'MambaForCausalLM' is not supported"):
        load_model(path)


def test_corrupt_rh_lens_weights(tmp_path, tokenizer):
    tiny_gqa = build_tiny_gqa(tokenizer, "hooked")
    path = save_model_dir(tmp_path / "m", cfg=tiny_gqa.cfg, state_dict=tiny_gqa.state_dict(),
                          tokenizer=tiny_gqa.tokenizer)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(path)


@pytest.mark.parametrize("spec", ["zoo:llama-s", "zoo:gpt2-s"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matrices_stored_as_f_linear_reads_them_change_no_bit(spec, dtype):
    model = load_model(spec, dtype=dtype, backend="hooked")
    assert model.unembed.W_U.T.is_contiguous()  # TransformerLens's .T.contiguous() is a view
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 90), generator=gen)
    with torch.no_grad():
        stored = model(tokens)
        for param in model.parameters():  # TransformerLens's own layout
            param.data = param.data.contiguous()
        plain = model(tokens)
    assert torch.equal(stored, plain)


def test_split_inputs_read_attention_matrices_in_transformer_lens_layout():
    from rh_lens.models import set_hook_flags

    model = load_model("zoo:llama-s", backend="hooked")
    assert model.blocks[0].attn.W_O.permute(2, 0, 1).is_contiguous()
    plain = load_model("zoo:llama-s", backend="hooked")
    for param in plain.parameters():
        param.data = param.data.contiguous()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 70), generator=gen)
    flags = {"use_split_qkv_input": True, "use_attn_result": True}
    saved = set_hook_flags(model, flags)
    set_hook_flags(plain, flags)
    assert model.blocks[0].attn.W_Q.is_contiguous()  # einsum's rounding follows the layout
    with torch.no_grad():
        assert torch.equal(model(tokens), plain(tokens))
    set_hook_flags(model, saved)
    assert model.blocks[0].attn.W_Q.transpose(1, 2).is_contiguous()
