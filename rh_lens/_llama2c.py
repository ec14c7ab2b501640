"""Loading karpathy/llama2.c checkpoints (legacy ``.bin`` + ``tok*.bin``) into a HookedTransformer.

Private to :mod:`rh_lens.models`, which calls :func:`load`.  The format is the one ``run.c`` reads:
a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
negative vocab_size means a separate classifier follows the other weights), then float32 arrays.
Every matrix is stored for ``run.c``'s ``matmul(xout, x, W, n, d)``, i.e. as ``[d_out, d_in]``
row-major, the same layout as a ``torch.nn.Linear`` weight.  llama2.c rotates ADJACENT pairs of
each head's query/key dimensions and does not permute q/k the way Hugging Face's Llama export
does, hence ``rotary_adjacent_pairs=True``.

The tokenizer is rebuilt as a ``tokenizers`` BPE whose merges are ranked by the llama2.c score
of the merged token, so that it reproduces ``run.c``'s ``encode()`` (dummy-prefix space, per
codepoint lookup with byte fallback, then repeated merging of the best-scoring adjacent pair)
while also decoding and giving character offsets.
"""

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from rh_lens._loading import quiet_loading
from rh_lens.errors import ModelLoadError

__all__ = ["Llama2cCheckpoint", "hooked_config", "hooked_state_dict", "load", "load_tokenizer",
           "read_checkpoint"]

HEADER = struct.Struct("<7i")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 in every llama2.c tokenizer
BYTE_OFFSET = len(SPECIAL_TOKENS)  # byte b is token b + 3 ("<0x00>".."<0xFF>")
ROPE_BASE = 10000
RMS_EPS = 1e-5


@dataclass(frozen=True)
class Llama2cCheckpoint:
    """The header and weights of a llama2.c checkpoint, matrices as ``[d_out, d_in]``.

    ``weights`` keys: ``token_embedding [vocab, dim]``, ``rms_att``/``rms_ffn [L, dim]``,
    ``wq [L, n_heads*hs, dim]``, ``wk``/``wv [L, n_kv_heads*hs, dim]``, ``wo [L, dim, n_heads*hs]``,
    ``w1``/``w3 [L, hidden, dim]``, ``w2 [L, dim, hidden]``, ``rms_final [dim]`` and
    ``wcls [vocab, dim]`` (the token embedding itself when ``shared_classifier``).
    """

    path: Path
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    weights: dict[str, Float[Tensor, "..."]]

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads


def _layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) -> list[tuple[str, tuple]]:
    """Names and shapes of the float32 arrays, in file order (``run.c``'s memory_map_weights)."""
    hs = dim // n_heads
    return [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, n_heads * hs, dim)),
        ("wk", (n_layers, n_kv * hs, dim)),
        ("wv", (n_layers, n_kv * hs, dim)),
        ("wo", (n_layers, dim, n_heads * hs)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, hs // 2)),  # precomputed RoPE tables: skipped
        ("freq_cis_imag", (seq_len, hs // 2)),
    ]


def read_checkpoint(path: str | Path) -> Llama2cCheckpoint:
    """Read and validate a llama2.c ``.bin`` checkpoint (no pickle: plain numpy reads).

    Raises :class:`ModelLoadError` naming the file when it is missing, its header is not a
    llama2.c header, or its size differs from what the header implies (corrupt or truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"llama2.c checkpoint {path} does not exist or is not a file")
    actual = path.stat().st_size
    if actual < HEADER.size:
        raise ModelLoadError(
            f"{path}: {actual} bytes, too short for the {HEADER.size}-byte llama2.c header; "
            "the file is corrupt or truncated"
        )
    with path.open("rb") as f:
        header = HEADER.unpack(f.read(HEADER.size))
    dim, hidden, n_layers, n_heads, n_kv, signed_vocab, seq_len = header
    vocab = abs(signed_vocab)
    if (
        min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0
        or dim % n_heads
        or n_heads % n_kv
        or (dim // n_heads) % 2
    ):
        raise ModelLoadError(
            f"{path}: header {header} (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, "
            "seq_len) is not a valid llama2.c header (values must be positive, n_heads must divide "
            "dim into an even head size, n_kv_heads must divide n_heads); the file is corrupt or "
            "truncated, or not a llama2.c checkpoint"
        )
    layout = _layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)
    shared = signed_vocab > 0
    if not shared:
        layout.append(("wcls", (vocab, dim)))
    n_floats = sum(math.prod(shape) for _, shape in layout)
    expected = HEADER.size + 4 * n_floats
    if actual != expected:
        raise ModelLoadError(
            f"{path}: expected {expected} bytes from its header {header} "
            f"({'shared' if shared else 'separate'} classifier), found {actual} bytes; "
            "the file is corrupt or truncated"
        )
    flat = np.fromfile(path, dtype="<f4", count=n_floats, offset=HEADER.size)
    if not np.isfinite(flat).all():
        raise ModelLoadError(f"{path}: weights contain NaN or infinity; the file is corrupt")
    tensors = torch.from_numpy(flat.astype(np.float32, copy=False))
    weights, start = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        if not name.startswith("freq_cis"):
            weights[name] = tensors[start : start + size].view(shape)
        start += size
    if shared:
        weights["wcls"] = weights["token_embedding"]
    return Llama2cCheckpoint(
        path=path, dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, vocab_size=vocab, seq_len=seq_len, shared_classifier=shared,
        weights=weights,
    )


def hooked_config(
    ckpt: Llama2cCheckpoint,
    *,
    n_ctx: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformerConfig:
    """A Llama-style TransformerLens config for ``ckpt`` (adjacent-pair RoPE, base 10000).

    ``n_ctx`` defaults to the trained ``seq_len``; a larger value only extends the rotary tables.
    Multi-head checkpoints (``n_kv_heads == n_heads``) get ``n_key_value_heads=None``, as TL's own
    Llama config does, so that they use plain rather than grouped-query attention.
    """
    if n_ctx is not None and n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive number of tokens, got {n_ctx}")
    return HookedTransformerConfig(
        model_name=ckpt.path.stem,
        original_architecture="LlamaForCausalLM",
        d_model=ckpt.dim,
        d_head=ckpt.head_size,
        n_heads=ckpt.n_heads,
        n_key_value_heads=ckpt.n_kv_heads if ckpt.n_kv_heads != ckpt.n_heads else None,
        d_mlp=ckpt.hidden_dim,
        n_layers=ckpt.n_layers,
        n_ctx=ckpt.seq_len if n_ctx is None else n_ctx,
        d_vocab=ckpt.vocab_size,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=RMS_EPS,
        positional_embedding_type="rotary",
        rotary_dim=ckpt.head_size,
        rotary_adjacent_pairs=True,
        rotary_base=ROPE_BASE,
        attn_only=False,
        default_prepend_bos=True,
        init_weights=False,  # every parameter is overwritten by the checkpoint
        device=str(device),
        dtype=dtype,
    )


def hooked_state_dict(
    ckpt: Llama2cCheckpoint, cfg: HookedTransformerConfig
) -> dict[str, Tensor]:
    """The checkpoint's weights under TransformerLens names, unprocessed (nothing folded).

    Mirrors ``transformer_lens.pretrained.weight_conversions.llama.convert_llama_weights``: the
    llama2.c ``[d_out, d_in]`` matrices play the role of HF's ``nn.Linear`` weights (w1 = gate,
    w3 = up, w2 = down), but without HF's q/k half-rotation permutation.
    """
    w = {k: v.to(cfg.dtype) for k, v in ckpt.weights.items()}
    gqa = cfg.n_key_value_heads is not None
    kv = "_" if gqa else ""
    n_kv = ckpt.n_kv_heads

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=cfg.dtype)

    sd = {"embed.W_E": w["token_embedding"]}
    for layer in range(ckpt.n_layers):
        p = f"blocks.{layer}"
        sd[f"{p}.ln1.w"] = w["rms_att"][layer]
        # [n_heads*hs, d_model] rows are (head, d_head); TL wants [head, d_model, d_head].
        wq = w["wq"][layer].reshape(ckpt.n_heads, ckpt.head_size, ckpt.dim)
        sd[f"{p}.attn.W_Q"] = wq.transpose(1, 2)
        for name in ("K", "V"):
            mat = w[f"w{name.lower()}"][layer].reshape(n_kv, ckpt.head_size, ckpt.dim)
            sd[f"{p}.attn.{kv}W_{name}"] = mat.transpose(1, 2)
            sd[f"{p}.attn.{kv}b_{name}"] = zeros(n_kv, ckpt.head_size)
        sd[f"{p}.attn.b_Q"] = zeros(ckpt.n_heads, ckpt.head_size)
        # wo is [d_model, n_heads*hs]; TL wants [head, d_head, d_model].
        sd[f"{p}.attn.W_O"] = w["wo"][layer].T.reshape(ckpt.n_heads, ckpt.head_size, ckpt.dim)
        sd[f"{p}.attn.b_O"] = zeros(ckpt.dim)
        sd[f"{p}.ln2.w"] = w["rms_ffn"][layer]
        sd[f"{p}.mlp.W_gate"] = w["w1"][layer].T
        sd[f"{p}.mlp.W_in"] = w["w3"][layer].T
        sd[f"{p}.mlp.W_out"] = w["w2"][layer].T
        sd[f"{p}.mlp.b_in"] = zeros(ckpt.hidden_dim)
        sd[f"{p}.mlp.b_out"] = zeros(ckpt.dim)
    sd["ln_final.w"] = w["rms_final"]
    sd["unembed.W_U"] = w["wcls"].T
    sd["unembed.b_U"] = zeros(ckpt.vocab_size)
    return {k: v.contiguous() for k, v in sd.items()}


def _read_tokenizer_file(path: Path) -> tuple[list[bytes], list[float]]:
    if not path.is_file():
        raise ModelLoadError(f"llama2.c tokenizer {path} does not exist or is not a file")
    data = path.read_bytes()
    if len(data) < 4 or struct.unpack_from("<i", data)[0] <= 0:
        raise ModelLoadError(f"{path}: not a llama2.c tokenizer (bad max_token_length header)")
    max_len = struct.unpack_from("<i", data)[0]
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise ModelLoadError(
                f"{path}: token {len(pieces)} is cut off at byte {offset} of {len(data)}; "
                "the file is corrupt or truncated"
            )
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not 0 < length <= max_len or offset + length > len(data):
            raise ModelLoadError(
                f"{path}: token {len(pieces)} claims {length} bytes at byte {offset} of "
                f"{len(data)} (max_token_length {max_len}); the file is corrupt or truncated"
            )
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    return pieces, scores


def load_tokenizer(path: str | Path, *, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to llama2.c's ``encode(text, bos=1, eos=0)``, BOS prepended.

    Merges are every split ``a + b`` of a vocabulary piece into two pieces, ranked by the merged
    piece's score (best first), so BPE picks the same pair as llama2.c's "highest-scoring
    adjacent pair" loop (leftmost on ties).  This is exact when distinct mergeable pieces have
    distinct scores, as in SentencePiece exports (score = -rank).  Pieces 0-2 are named
    ``<unk> <s> </s>`` and never merge; ``split_special_tokens`` keeps a literal ``"<s>"`` in the
    text as characters, as llama2.c does.  ``vocab_size``, when given, must match the file.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    path = Path(path)
    pieces, scores = _read_tokenizer_file(path)
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ModelLoadError(
            f"tokenizer {path} has {len(pieces)} tokens but the checkpoint's vocab_size is "
            f"{vocab_size}: they do not belong together (or the tokenizer is truncated)"
        )
    bad = [i for i in range(256) if pieces[BYTE_OFFSET + i : BYTE_OFFSET + i + 1]
           != [f"<0x{i:02X}>".encode()]]
    if bad:
        raise ModelLoadError(
            f"{path}: tokens 3..258 must be the byte tokens <0x00>..<0xFF> of a llama2.c "
            f"tokenizer (first mismatch at byte {bad[0]})"
        )
    try:
        texts = [p.decode("utf-8") for p in pieces]
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{path}: a token is not valid UTF-8 ({err})") from err
    names = [*SPECIAL_TOKENS, *texts[BYTE_OFFSET:]]
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        raise ModelLoadError(f"{path}: the vocabulary holds duplicate tokens")
    ordinary = {t: i for i, t in enumerate(texts) if i >= BYTE_OFFSET}
    ranked = sorted(
        (-scores[i], i, k, (t[:k], t[k:]))
        for t, i in ordinary.items()
        for k in range(1, len(t))
        if t[:k] in ordinary and t[k:] in ordinary
    )
    bpe = models.BPE(vocab=vocab, merges=[m[-1] for m in ranked], unk_token="<unk>",
                     byte_fallback=True, fuse_unk=False)
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.Prepend(" ")  # llama2.c's dummy prefix; a no-op on ""
    tk.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True, split_special_tokens=True,
    )
    # TL's set_tokenizer reads init_kwargs["name_or_path"]; with add_bos_token=True it never
    # reloads the tokenizer from that name (which would try the Hugging Face Hub).
    tok.name_or_path = str(path)
    tok.init_kwargs["name_or_path"] = str(path)
    return tok


def _default_tokenizer(model_path: Path, vocab_size: int) -> Path:
    for name in (f"tok{vocab_size}.bin", "tokenizer.bin"):
        if (model_path.parent / name).is_file():
            return model_path.parent / name
    raise ModelLoadError(
        f"no tokenizer for {model_path}: neither tok{vocab_size}.bin nor tokenizer.bin lies "
        "beside it; pass it explicitly as 'llama2c:MODEL.bin,TOKENIZER.bin'"
    )


def load(
    model_path: str | Path,
    tokenizer_path: str | Path | None = None,
    *,
    n_ctx: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """An eval-mode HookedTransformer whose logits equal llama2.c's ``run.c`` forward.

    The tokenizer defaults to ``tok{vocab_size}.bin`` or ``tokenizer.bin`` beside the model.
    Weights are loaded unprocessed (no LayerNorm folding or centring) and every parameter must
    be provided by the checkpoint; only buffers TL builds itself (rotary tables, masks) are not.
    """
    model_path = Path(model_path)
    ckpt = read_checkpoint(model_path)
    if tokenizer_path is None:
        tokenizer_path = _default_tokenizer(model_path, ckpt.vocab_size)
    tok = load_tokenizer(tokenizer_path, vocab_size=ckpt.vocab_size)
    cfg = hooked_config(ckpt, n_ctx=n_ctx, device=device, dtype=dtype)
    state_dict = hooked_state_dict(ckpt, cfg)
    with quiet_loading():
        model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    wrong = [k for k in set(params) & set(state_dict) if params[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        raise ModelLoadError(
            f"{model_path}: weights do not fit the TransformerLens config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {sorted(wrong)[:5]}"
        )
    missing_buffers, _ = model.load_state_dict(state_dict, strict=False)
    assert set(missing_buffers) <= set(dict(model.named_buffers())), missing_buffers
    with quiet_loading():
        model = model.to(cfg.device)
    return model.eval()
