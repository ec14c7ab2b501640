"""llama2.c checkpoints loaded into a HookedTransformer, checked against llama2.c itself.

The references here are written from karpathy/llama2.c's ``run.c`` (its reader, ``forward()``
and ``encode()``), not from rh_lens: a plain transcription of the forward pass, the tokenizer's
score-greedy merge loop, and the model's documented greedy continuation.  The real model files
live in ``../shared/models/llama2c`` and are read in place; the tests skip without them.
"""

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rh_lens import _llama2c
from rh_lens.errors import ModelLoadError
from tests.conftest import SHARED

pytestmark = pytest.mark.needs_shared

LLAMA2C = SHARED / "models" / "llama2c"
MODEL = LLAMA2C / "stories260K.bin"
TOKENIZER = LLAMA2C / "tok512.bin"

PROMPT = (
    "Once upon a time, there was a little dog named Max. Max liked to run in the garden with "
    "his red ball. One day, the ball rolled"
)
STRINGS = [
    "Once upon a time, there was a little girl named Lily.",
    "The cat sat on the mat. It was happy!",
    "\"Can I play?\" asked Tom; Mom said: 'Yes, you can.'",
    "She counted 1, 2, 3... up to 1024 (and 42)!",
    "two  spaces   three    four",
    "line one\nline two\n\nend\n",
    "  leading and trailing  ",
    "café naïve résumé",
    "a snowman ☃, 日本語 and 🙂",
    "tab\there",
    "<s> looks special </s> but is text <unk>",
    "the theme then there other others",
    "",
]


def _require(*paths: Path) -> None:
    for path in paths:
        if not path.exists():
            pytest.skip(f"{path} is not available")


# --------------------------------------------------------------------------------------------
# llama2.c's run.c, transcribed: reader, forward(), tokenizer reader and encode()


def run_c_read(path: Path) -> dict:
    """``read_checkpoint`` + ``memory_map_weights`` of run.c, matrices as run.c's W (d, n)."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    floats = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    hs = dim // n_heads
    kv_dim = n_kv * hs
    ptr = 0

    def take(*shape):
        nonlocal ptr
        n = int(np.prod(shape))
        out = floats[ptr : ptr + n].reshape(shape)
        ptr += n
        return out

    w = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv, hs=hs, kv_dim=kv_dim)
    w["emb"] = take(vocab, dim)
    w["rms_att"] = take(n_layers, dim)
    w["wq"] = take(n_layers, dim, dim)  # matmul(q, xb, wq + l*dim*dim, n=dim, d=dim)
    w["wk"] = take(n_layers, kv_dim, dim)
    w["wv"] = take(n_layers, kv_dim, dim)
    w["wo"] = take(n_layers, dim, dim)
    w["rms_ffn"] = take(n_layers, dim)
    w["w1"] = take(n_layers, hidden, dim)
    w["w2"] = take(n_layers, dim, hidden)
    w["w3"] = take(n_layers, hidden, dim)
    w["rms_final"] = take(dim)
    take(seq_len * hs // 2)  # freq_cis_real
    take(seq_len * hs // 2)  # freq_cis_imag
    w["wcls"] = w["emb"] if shared else take(vocab, dim)
    assert ptr == len(floats)
    return w


def _rmsnorm(x, weight):
    return weight * (x / np.sqrt(np.mean(x * x) + 1e-5))


def run_c_forward(w: dict, tokens: list[int]) -> np.ndarray:
    """run.c's ``forward(transformer, token, pos)`` for each position in turn, with its KV cache."""
    dim, hs, kv_dim = w["dim"], w["hs"], w["kv_dim"]
    kv_mul = w["n_heads"] // w["n_kv"]
    key_cache = np.zeros((w["n_layers"], len(tokens), kv_dim))
    value_cache = np.zeros_like(key_cache)
    all_logits = []
    for pos, token in enumerate(tokens):
        x = w["emb"][token].copy()
        for layer in range(w["n_layers"]):
            xb = _rmsnorm(x, w["rms_att"][layer])
            q = w["wq"][layer] @ xb
            k = w["wk"][layer] @ xb
            v = w["wv"][layer] @ xb
            for i in range(0, dim, 2):  # RoPE on adjacent pairs (i, i+1) of each head
                head_dim = i % hs
                freq = 1.0 / 10000.0 ** (head_dim / hs)
                fcr, fci = np.cos(pos * freq), np.sin(pos * freq)
                for vec in (q, k) if i < kv_dim else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i] = v0 * fcr - v1 * fci
                    vec[i + 1] = v0 * fci + v1 * fcr
            key_cache[layer, pos] = k
            value_cache[layer, pos] = v
            xb = np.zeros(dim)
            for h in range(w["n_heads"]):
                qh = q[h * hs : (h + 1) * hs]
                kv = slice((h // kv_mul) * hs, (h // kv_mul + 1) * hs)
                att = key_cache[layer, : pos + 1, kv] @ qh / np.sqrt(hs)
                att = np.exp(att - att.max())
                att /= att.sum()
                xb[h * hs : (h + 1) * hs] = att @ value_cache[layer, : pos + 1, kv]
            x = x + w["wo"][layer] @ xb
            xb = _rmsnorm(x, w["rms_ffn"][layer])
            hb = w["w1"][layer] @ xb
            hb2 = w["w3"][layer] @ xb
            hb = hb * (1.0 / (1.0 + np.exp(-hb))) * hb2  # SwiGLU
            x = x + w["w2"][layer] @ hb
        all_logits.append(w["wcls"] @ _rmsnorm(x, w["rms_final"]))
    return np.stack(all_logits)


def run_c_read_tokenizer(path: Path) -> tuple[list[bytes], list[float]]:
    raw = path.read_bytes()
    offset, pieces, scores = 4, [], []
    while offset < len(raw):
        score, length = struct.unpack_from("<fi", raw, offset)
        pieces.append(raw[offset + 8 : offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    return pieces, scores


def run_c_encode(pieces: list[bytes], scores: list[float], text: str) -> list[int]:
    """run.c's ``encode(t, text, bos=1, eos=0, ...)``."""
    lookup = {piece: i for i, piece in enumerate(pieces)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])  # add_dummy_prefix
    for char in text:
        utf8 = char.encode("utf-8")
        if utf8 in lookup:
            tokens.append(lookup[utf8])
        else:
            tokens.extend(byte + 3 for byte in utf8)  # byte fallback
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if merged != -1 and scores[merged] > best_score:
                best_score, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """This model is tiny: intra-op threads only add overhead, and on a busy 2-core machine
    they made one forward 60x slower (0.5 s vs 8 ms).  Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model():
    _require(MODEL, TOKENIZER)
    return _llama2c.load(MODEL)


@pytest.fixture(scope="session")
def vocab():
    _require(TOKENIZER)
    return run_c_read_tokenizer(TOKENIZER)


@pytest.fixture(scope="session")
def prompt_tokens(vocab) -> list[int]:
    tokens = run_c_encode(*vocab, PROMPT)
    assert 35 <= len(tokens) <= 50
    return tokens


# --------------------------------------------------------------------------------------------
# 1. Logits equal run.c's forward


def test_logits_match_run_c_forward(model, prompt_tokens):
    ref = torch.from_numpy(run_c_forward(run_c_read(MODEL), prompt_tokens))
    logits = model(torch.tensor([prompt_tokens]))[0].double()
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    assert (logits.argmax(-1) == ref.argmax(-1)).all()


def test_float64_load_matches_run_c_to_rounding(prompt_tokens):
    model64 = _llama2c.load(MODEL, dtype=torch.float64)
    ref = torch.from_numpy(run_c_forward(run_c_read(MODEL), prompt_tokens))
    logits = model64(torch.tensor([prompt_tokens]))[0]
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, ref, atol=1e-9, rtol=0)


def test_separate_classifier_and_multihead_checkpoint(tmp_path, vocab, prompt_tokens):
    """A random checkpoint with vocab_size < 0 (own wcls) and n_kv_heads == n_heads."""
    dim, hidden, n_layers, n_heads, n_vocab, seq_len = 32, 48, 2, 4, len(vocab[0]), 64
    hs = dim // n_heads
    rng = np.random.default_rng(0)
    shapes = [(n_vocab, dim), (n_layers, dim), *[(n_layers, dim, dim)] * 4, (n_layers, dim),
              (n_layers, hidden, dim), (n_layers, dim, hidden), (n_layers, hidden, dim), (dim,),
              (seq_len, hs // 2), (seq_len, hs // 2), (n_vocab, dim)]
    arrays = [rng.normal(0, 0.6, s).astype("<f4") for s in shapes]
    path = tmp_path / "random.bin"
    header = struct.pack("<7i", dim, hidden, n_layers, n_heads, n_heads, -n_vocab, seq_len)
    path.write_bytes(header + b"".join(a.tobytes() for a in arrays))
    ckpt = _llama2c.read_checkpoint(path)
    assert not ckpt.shared_classifier and ckpt.vocab_size == n_vocab
    rand = _llama2c.load(path, TOKENIZER)
    assert rand.cfg.n_key_value_heads is None and rand.cfg.n_ctx == seq_len
    ref = torch.from_numpy(run_c_forward(run_c_read(path), prompt_tokens))
    logits = rand(torch.tensor([prompt_tokens]))[0].double()
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


def test_larger_n_ctx_extends_rotary_without_changing_logits(model, prompt_tokens):
    long = _llama2c.load(MODEL, n_ctx=1024)
    assert long.cfg.n_ctx == 1024
    tokens = torch.tensor([prompt_tokens * 16])[:, :600]
    logits = long(tokens)
    assert logits.shape == (1, 600, 512) and torch.isfinite(logits).all()
    n = len(prompt_tokens)
    torch.testing.assert_close(logits[:, :n], model(tokens[:, :n]))


def test_load_model_spec(model):
    from rh_lens.models import load_model

    loaded = load_model(f"llama2c:{MODEL},{TOKENIZER}")
    tokens = loaded.to_tokens("Once upon a time")
    torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# 2. The documented greedy continuation


def test_greedy_continuation_is_the_documented_story(model):
    tokens = model.to_tokens("Once upon a time")
    assert tokens[0, 0].item() == 1 and (tokens[0, 1:] != 1).all()
    with torch.no_grad():
        for _ in range(30):
            next_token = model(tokens)[0, -1].argmax()
            tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    text = model.tokenizer.decode(tokens[0], skip_special_tokens=True)
    # From the model's README: "... there was a little girl named Lily. She loved to play
    # outside in the park."
    assert text.startswith("Once upon a time")
    assert "there was a little girl named Lily. She loved to play outside in the park." in text


# --------------------------------------------------------------------------------------------
# 3. The tokenizer is llama2.c's encode()


@pytest.fixture(scope="session")
def tokenizer():
    _require(TOKENIZER)
    return _llama2c.load_tokenizer(TOKENIZER)


@pytest.mark.parametrize("text", STRINGS)
def test_tokenizer_equals_run_c_encode(tokenizer, vocab, text):
    ids = tokenizer(text)["input_ids"]
    assert ids == run_c_encode(*vocab, text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_equals_run_c_encode_on_random_text(tokenizer, vocab):
    pieces = [p.decode() for p in vocab[0][259:]]
    rng = np.random.default_rng(1)
    for _ in range(60):
        parts = rng.choice(pieces + list(" \n.é☃🙂xyz"), size=rng.integers(1, 25))
        text = "".join(parts)
        assert tokenizer(text)["input_ids"] == run_c_encode(*vocab, text), repr(text)
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_specials_offsets_and_transformer_lens(model, vocab):
    tok = model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]
    text = STRINGS[0]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert "".join(text[a:b] for a, b in enc["offset_mapping"]) == text
    assert model.to_tokens(text)[0].tolist() == run_c_encode(*vocab, text)
    assert model.to_string(model.to_tokens(text)[0, 1:]) == text


# --------------------------------------------------------------------------------------------
# 4. Bad input


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_corrupt_checkpoints_raise(tmp_path):
    _require(MODEL)
    raw = MODEL.read_bytes()
    half = _write(tmp_path, "half.bin", raw[: len(raw) // 2])
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(half))}: expected {len(raw)} "
                       rf"bytes.*found {len(raw) // 2} bytes.*corrupt or truncated"):
        _llama2c.read_checkpoint(half)
    extra = _write(tmp_path, "extra.bin", raw + b"\0" * 4)
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(extra))}: expected {len(raw)} "
                       rf"bytes.*found {len(raw) + 4} bytes"):
        _llama2c.read_checkpoint(extra)
    garbage = _write(tmp_path, "garbage.bin", b"\xff" * 28 + raw[28:])
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(garbage))}: header .*not a valid"):
        _llama2c.read_checkpoint(garbage)
    zero_heads = _write(tmp_path, "zero.bin", struct.pack("<7i", 64, 172, 5, 0, 4, 512, 512))
    with pytest.raises(ModelLoadError, match=re.escape(str(zero_heads))):
        _llama2c.read_checkpoint(zero_heads)
    tiny = _write(tmp_path, "tiny.bin", raw[:10])
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(tiny))}.*too short"):
        _llama2c.read_checkpoint(tiny)
    nan = bytearray(raw)
    nan[28 + 4 * 40000 : 28 + 4 * 40001] = struct.pack("<f", float("nan"))
    nan_path = _write(tmp_path, "nan.bin", bytes(nan))
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(nan_path))}.*NaN"):
        _llama2c.read_checkpoint(nan_path)
    with pytest.raises(ModelLoadError, match=r"missing\.bin does not exist"):
        _llama2c.read_checkpoint(tmp_path / "missing.bin")


def test_missing_and_corrupt_tokenizers_raise(tmp_path, vocab):
    _require(MODEL, TOKENIZER)
    alone = tmp_path / "alone" / "model.bin"
    alone.parent.mkdir()
    alone.write_bytes(MODEL.read_bytes())
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(alone))}.*tok512\.bin.*explicitly"):
        _llama2c.load(alone)
    with pytest.raises(ModelLoadError, match=r"nothere\.bin does not exist"):
        _llama2c.load(MODEL, tmp_path / "nothere.bin")
    raw = TOKENIZER.read_bytes()
    cut = _write(tmp_path, "cut.bin", raw[: len(raw) // 2 + 3])
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(cut))}.*corrupt or truncated"):
        _llama2c.load_tokenizer(cut)
    # Cut exactly after token 300: readable on its own, but too small for the checkpoint.
    boundary = 4 + sum(8 + len(p) for p in vocab[0][:300])
    short = _write(tmp_path, "short.bin", raw[:boundary])
    assert len(_llama2c.load_tokenizer(short)) == 300
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(short))} has 300 tokens.*512"):
        _llama2c.load(MODEL, short)
