"""Models of real shapes with random weights: time and memory at the scale users run, with no
download.

:data:`SHAPES` holds the published architecture numbers of a few 7-8B models;
:func:`random_model` builds one as a Hugging Face ``LlamaForCausalLM`` with seeded random weights
(``--layers`` truncates its depth, so that the same code runs at small cost on a CPU), and
:func:`placeholder_tokenizer` gives it a tokenizer of the right vocabulary size.  Either engine
wraps the result: :func:`rh_lens.hf_export.hooked_from_hf` for a HookedTransformer,
:func:`bridge_of` for a TransformerBridge.  Retrieval behaviour means nothing on random weights;
the point is what a forward costs.

Differences from the released models that change neither time nor memory measurably: no rotary
scaling (Llama 3.1's long-context rescaling of frequencies), and Qwen2.5's query/key/value biases
left out (``d_model + 2 * n_kv_heads * d_head`` numbers per layer).
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

__all__ = ["SHAPES", "Shape", "bridge_of", "placeholder_tokenizer", "random_model"]


@dataclass(frozen=True)
class Shape:
    """The numbers that fix a decoder's cost: sizes of every matrix and of the vocabulary."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    rope_theta: float
    rms_eps: float
    context: int  # the released model's context window

    def truncated(self, layers: int | None) -> "Shape":
        """The same shape with its first ``layers`` layers (all of them for None)."""
        if layers is None:
            return self
        if not 1 <= layers <= self.n_layers:
            raise ValueError(f"--layers must be in 1..{self.n_layers} for {self.name}, "
                             f"got {layers}")
        return replace(self, n_layers=layers)

    def n_params(self) -> int:
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.d_model * self.d_mlp
        per_layer = attn + mlp + 2 * self.d_model
        return self.n_layers * per_layer + 2 * self.d_vocab * self.d_model + self.d_model


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("llama-3.1-8b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_head=128,
          d_mlp=14336, d_vocab=128256, rope_theta=500000.0, rms_eps=1e-5, context=131072),
    Shape("llama-2-7b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, d_head=128,
          d_mlp=11008, d_vocab=32000, rope_theta=10000.0, rms_eps=1e-5, context=4096),
    Shape("mistral-7b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_head=128,
          d_mlp=14336, d_vocab=32768, rope_theta=1000000.0, rms_eps=1e-5, context=32768),
    Shape("qwen2.5-7b", n_layers=28, d_model=3584, n_heads=28, n_kv_heads=4, d_head=128,
          d_mlp=18944, d_vocab=152064, rope_theta=1000000.0, rms_eps=1e-6, context=131072),
)}


def get_shape(name: str, *, layers: int | None = None) -> Shape:
    """The shape called ``name``, truncated to ``layers`` layers."""
    try:
        shape = SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; expected one of {', '.join(SHAPES)}") \
            from None
    return shape.truncated(layers)


@torch.no_grad()
def random_model(shape: Shape, *, n_ctx: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` with seeded random weights, in eval mode.

    Every matrix is drawn from N(0, 0.02^2) as Hugging Face initialises Llama models (attention
    logits then have a spread of about 1.6, rows far from uniform) and every norm weight is 1;
    the draws are made on ``device`` in ``dtype``, so equal seeds give equal weights on one
    device.  ``n_ctx`` is the longest sequence the model will see.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.d_vocab, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads, head_dim=shape.d_head,
        max_position_embeddings=n_ctx, rope_theta=shape.rope_theta, rms_norm_eps=shape.rms_eps,
        tie_word_embeddings=False, attn_implementation="sdpa",
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)  # no float32 copy first
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("norm.weight") or "layernorm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # meta buffers
    model.name_or_path = f"random:{shape.name}"
    return model.eval()


def placeholder_tokenizer(d_vocab: int):
    """A tokenizer with ``d_vocab`` made-up words ``t0 t1 ...`` (id 0 begins a sequence, 1 ends
    it, 2 pads): enough for the engines, which need one, on random token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(d_vocab)}
    raw = Tokenizer(models.WordLevel(words, unk_token="t3"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    raw.post_processor = processors.TemplateProcessing(single="t0 $A", special_tokens=[("t0", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="t0", eos_token="t1",
                                  pad_token="t2", unk_token="t3", add_bos_token=True)
    # TransformerLens reloads a tokenizer by this name unless it adds a BOS token itself
    tok.name_or_path = tok.init_kwargs["name_or_path"] = f"placeholder-{d_vocab}"
    return tok


def bridge_of(hf_model: nn.Module, tokenizer, *, n_ctx: int, fast_prefill: bool = True):
    """A TransformerBridge around ``hf_model`` (its parameters, not a copy)."""
    from rh_lens import _bridge

    first = next(hf_model.parameters())
    name = getattr(hf_model, "name_or_path", "random")
    return _bridge.boot(hf_model, tokenizer, name=name, source=name, device=first.device,
                        dtype=first.dtype, n_ctx=n_ctx, fast_prefill=fast_prefill).eval()
