"""The TransformerBridge backend: Hugging Face's own model, with TransformerLens's hook names.

Private to :mod:`rh_lens.models` and :mod:`rh_lens.engine`.  ``TransformerBridge`` (in
transformer-lens 3.9 and the only engine of 4.x) wraps a Hugging Face model and recomputes
attention eagerly inside it, so ``hook_pattern`` & co. have HookedTransformer's names and
shapes while the weights, rotary embeddings and key/value cache are Hugging Face's.  Three things
live here:

- loading: a local Hugging Face directory, a Hub name (from the local cache), or a
  HookedTransformer-format model (the zoo, llama2.c) converted in memory to the equivalent Hugging
  Face Llama or GPT-2 model;
- the forward of one chunk against a ``transformers.DynamicCache`` (a full cache on every layer,
  so that key positions stay absolute even for sliding-window configs);
- the fast path: twins of the Hugging Face model that share every parameter and buffer.  When
  no hook is attached to the bridge (nothing could observe the difference), a chunk of more
  than one token is forwarded through an SDPA twin (the fast prefill), and a decode step that
  records where each head attends through an eager twin, whose attention weights Hugging Face
  returns without any hook.  Anything hooked goes through the bridge.
"""

import contextlib
import copy
import logging
import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from rh_lens import _llama_step
from rh_lens._loading import quiet_loading, require_rotary
from rh_lens.errors import ModelLoadError
from rh_lens.scoring import span_mass

TWIN_ATTR = "_rh_lens_sdpa_twin"
EAGER_ATTR = "_rh_lens_eager_twin"
POINTS_ATTR = "_rh_lens_hook_points"


def is_bridge(model) -> bool:
    return isinstance(model, TransformerBridge)


# --------------------------------------------------------------------------------------------
# Key/value cache and the forward step


def new_cache(model: TransformerBridge, batch: int):
    """An empty ``DynamicCache``; its layers are created (full, never windowed) on first use."""
    from transformers import DynamicCache

    return DynamicCache()


def forward_chunk(
    model: TransformerBridge, tokens: Int[Tensor, "batch pos"], cache, n_past: int,
    mask: Int[Tensor, "batch past_and_pos"] | None = None, *, argmax: bool = False,
    logits: bool = True, spans: Int[Tensor, "batch 2"] | None = None,
    unhooked: bool | None = None, last_only: bool = False,
) -> tuple[Float[Tensor, "batch logit_pos d_vocab"] | None,
           Int[Tensor, "batch n_layers n_heads"] | None,
           Float[Tensor, "batch n_layers n_heads"] | None]:
    """Forward ``tokens`` after ``n_past`` cached positions; ``cache`` grows by their keys/values.

    ``mask`` covers the cached and the new positions (0 at left padding); None means all
    ones, so that real tokens sharing the pad token's id are never masked.  With padding, the
    position ids count real tokens only (Hugging Face numbers them by column otherwise).
    Returns the logits (None with ``logits=False``, when the SDPA twin then unembeds only the
    last position) and, with ``argmax`` and :func:`records_unhooked`, every head's argmax key
    position for the last query, read from the eager twin's attention weights (else None), and
    with ``spans`` too, the last query's attention mass on them (else None); a Llama model's
    one-token step without ``spans`` runs the twin's operations without its module machinery
    (:mod:`rh_lens._llama_step`, bit for bit the same).  ``unhooked`` is the result of
    :func:`hooks_attached`, negated, when the caller has just scanned the hook points.
    """
    batch, n_new = tokens.shape
    kw = {_cache_kwarg(model.original_model): cache}
    given = mask
    if mask is None:
        mask = torch.ones((batch, n_past + n_new), dtype=torch.long, device=tokens.device)
    else:
        kw["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, n_past:]
    if unhooked is None:  # the caller may have scanned the hook points already
        unhooked = not hooks_attached(model)
    twin = model.__dict__.get(TWIN_ATTR)
    if argmax and unhooked and model.__dict__.get(EAGER_ATTR) is not None:
        if n_new > 1 and last_only and twin is not None and _llama_step.supports_sdpa(twin.model):
            twin.tie()  # the SDPA forward, reading its last query's weights as eager does
            return _llama_step.prefill(twin.model, tokens, cache, mask, kw.get("position_ids"),
                                       read_last=True, spans=spans)
        eager = model.__dict__[EAGER_ATTR]
        eager.tie()
        if n_new == 1 and spans is None and _llama_step.supports(eager.model):  # bit for bit
            return (*_llama_step.step(eager.model, tokens, cache, given, kw.get("position_ids")),
                    None)
        out = eager.model(input_ids=tokens, attention_mask=mask, use_cache=True,
                          output_attentions=True, **kw)
        table = torch.stack([a[:, :, -1].argmax(dim=-1) for a in out.attentions], dim=1)
        mass = None if spans is None else torch.stack(
            [span_mass(a[:, :, -1], spans) for a in out.attentions], dim=1)
        return out.logits, table, mass
    if twin is not None and n_new > 1 and unhooked:
        twin.tie()
        if not logits and _llama_step.supports_sdpa(twin.model):  # bit for bit, no logits
            _llama_step.prefill(twin.model, tokens, cache, mask, kw.get("position_ids"))
            return None, None, None
        keep = {} if logits and not last_only else {"logits_to_keep": 1}
        out = twin.model(input_ids=tokens, attention_mask=mask, use_cache=True, **kw, **keep)
        return (out.logits if logits else None), None, None
    out = model(tokens, attention_mask=mask, use_cache=True, **kw)
    return (out if logits else None), None, None


def has_eager_twin(model: TransformerBridge) -> bool:
    return model.__dict__.get(EAGER_ATTR) is not None


def reads_whole_chunks(model: TransformerBridge) -> bool:
    """Whether a chunk's last query can be read inside the fast prefill: a Llama model with
    both twins and no hook attached."""
    twin = model.__dict__.get(TWIN_ATTR)
    return (has_eager_twin(model) and twin is not None and _llama_step.supports_sdpa(twin.model)
            and not hooks_attached(model))


def records_unhooked(model: TransformerBridge) -> bool:
    """Whether a forward can read the attention argmax without hooks: the bridge has an eager
    twin and no hook is attached (nothing could observe the difference)."""
    return has_eager_twin(model) and not hooks_attached(model)


def select_rows(cache, rows: Int[Tensor, " keep"]) -> None:
    """Keep only batch rows ``rows`` of a ``DynamicCache``."""
    cache.batch_select_indices(rows)


def _cache_kwarg(hf_model: nn.Module) -> str:
    """``cache`` from transformers 5.24 on, ``past_key_values`` before (now deprecated)."""
    import inspect

    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters \
        else "past_key_values"


def hook_points(model: TransformerBridge) -> dict:
    """The bridge's canonical hook names -> hook points, built once per model (the
    ``hook_dict`` property walks every component on each access)."""
    points = model.__dict__.get(POINTS_ATTR)
    if points is None:
        points = dict(model.hook_dict)
        object.__setattr__(model, POINTS_ATTR, points)  # not a submodule
    return points


def hooks_attached(model: TransformerBridge) -> bool:
    """Whether any hook point of the bridge has a forward hook (``model.hooks``, ``add_hook``)."""
    return any(hp._forward_hooks or hp._forward_pre_hooks for hp in hook_points(model).values())


def has_fast_prefill(model: TransformerBridge) -> bool:
    return model.__dict__.get(TWIN_ATTR) is not None


class Twin:
    """The same Hugging Face model class with another ``attn_implementation`` (``"sdpa"`` for
    the fast prefill, ``"eager"`` for decode steps that read attention weights without hooks),
    built on the meta device and pointed at the source model's own parameters and buffers (no
    copy).

    It must be built before the bridge wraps the source model's modules.  ``tie()`` re-points
    every tensor before use, so moving the bridge (``.to(...)``) cannot leave the twin behind.
    """

    def __init__(self, source: nn.Module, attn_implementation: str = "sdpa"):
        config = copy.deepcopy(source.config)
        with torch.device("meta"):
            self.model = type(source)._from_config(config,
                                                   attn_implementation=attn_implementation)
        self.model.eval()
        twin_modules = dict(self.model.named_modules())
        self.links = []
        for name, module in source.named_modules():
            if name not in twin_modules:
                raise ModelLoadError(f"{attn_implementation} twin lacks module {name!r}")
            self.links.append((twin_modules[name], module))
        self.tie()
        left = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
                if t.is_meta]
        if left:
            raise ModelLoadError(f"{attn_implementation} twin has tensors the source model "
                                 f"lacks: {left[:5]}")

    def tie(self) -> None:
        for twin, source in self.links:
            twin._parameters.update(source._parameters)
            twin._buffers.update(source._buffers)


# --------------------------------------------------------------------------------------------
# Loading


def load_hf_directory(path, *, device, dtype, n_ctx, fast_prefill) -> TransformerBridge:
    """A local Hugging Face checkpoint, read offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype=dtype, attn_implementation="eager"
            )
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{path}: transformers cannot load it: {err}") from err
    return boot(hf_model.to(device), tokenizer, name=path.resolve().name, source=str(path),
                device=device, dtype=dtype, n_ctx=n_ctx, fast_prefill=fast_prefill)


def load_named(name: str, *, device, dtype, n_ctx, fast_prefill) -> TransformerBridge:
    """A Hub model (the caller has checked that it is cached or reachable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            hf_model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, attn_implementation="eager"
            )
        except OSError as err:
            raise ModelLoadError(f"could not load {name!r}: {err}") from err
    return boot(hf_model.to(device), tokenizer, name=name, source=name, device=device,
                dtype=dtype, n_ctx=n_ctx, fast_prefill=fast_prefill)


def load_hooked_format(
    fields: dict, state_dict: dict[str, Tensor], tokenizer, *, device, dtype, fast_prefill,
    source: str,
) -> TransformerBridge:
    """A HookedTransformer config (as a dict) + TL state dict, as the equivalent HF model."""
    hf_model = hf_from_hooked(fields, state_dict, tokenizer, source=source).to(device, dtype)
    bridge = boot(hf_model, tokenizer, name=fields.get("model_name") or source, source=source,
                  device=device, dtype=dtype, n_ctx=None, fast_prefill=fast_prefill)
    bridge.cfg.n_ctx = fields["n_ctx"]
    bridge.cfg.default_prepend_bos = fields.get("default_prepend_bos", True)
    return bridge


def boot(hf_model, tokenizer, *, name, source, device, dtype, n_ctx, fast_prefill):
    twin = eager = None
    if fast_prefill is not False:
        try:
            twin = Twin(hf_model, "sdpa")
            eager = Twin(hf_model, "eager")
        except (ValueError, ImportError, ModelLoadError) as err:
            if fast_prefill:
                raise ModelLoadError(f"{source}: no SDPA fast prefill: {err}") from err
    tokenizer.init_kwargs.setdefault("name_or_path", tokenizer.name_or_path)
    with quiet_loading(), _quiet_tl_warnings():
        try:
            bridge = TransformerBridge.boot_transformers(
                source, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
            )
        except (ValueError, NotImplementedError, KeyError) as err:
            raise ModelLoadError(f"{source}: TransformerBridge cannot wrap this model: {err}") \
                from err
    bridge.cfg.model_name = name
    if n_ctx is not None:
        require_rotary(bridge.cfg.positional_embedding_type, bridge.cfg.n_ctx, n_ctx, source)
        bridge.cfg.n_ctx = n_ctx
    object.__setattr__(bridge, TWIN_ATTR, twin)  # not a submodule: no state_dict, no .to()
    object.__setattr__(bridge, EAGER_ATTR, eager)
    _pass_cache_to_attention(bridge)
    return bridge


def _pass_cache_to_attention(bridge: TransformerBridge) -> None:
    """Hand the key/value cache to the bridge's attention under the name it reads.

    transformers 5.24 renamed the decoder layers' ``past_key_values`` argument to ``cache``;
    the attention bridges of transformer-lens 3.9 and 4.3 read only ``past_key_values`` (or
    ``layer_past``), so with a cache they silently never stored keys: every chunk after the
    first attended to itself alone.  A keyword pre-hook on each attention module (a plain torch
    hook, which the bridge's ``reset_hooks`` leaves alone) copies ``cache`` across.
    """

    def hook(module, args, kwargs):
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = kwargs["cache"]
            return args, kwargs
        return None

    for module in bridge.modules():
        if hasattr(module, "_update_kv_cache"):
            module.register_forward_pre_hook(hook, with_kwargs=True)


@contextlib.contextmanager
def _quiet_tl_warnings():
    """TL logs n_ctx and alias notices on the root logger; rh_lens reports what matters."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------
# HookedTransformer format -> Hugging Face model


def hf_from_hooked(fields: dict, sd: dict[str, Tensor], tokenizer, *, source: str) -> nn.Module:
    """The Hugging Face Llama or GPT-2 model that computes what HookedTransformer(fields) does.

    Only the two shapes rh_lens's own models use are converted (the zoo's Llama and GPT-2
    families, llama2.c); anything else is refused rather than converted approximately.
    Adjacent-pair rotary (llama2.c) becomes HF's half-split rotary by permuting the query and
    key dimensions within each head, which leaves every attention score unchanged.
    """
    f = _HookedFields(fields, source)
    sd = {k: v.detach().float() for k, v in sd.items()}
    f.require(not f.get("attn_only", False) and not f.get("parallel_attn_mlp", False),
              "attention-only or parallel attention/MLP blocks")
    scale = float(f.get("attn_scale", -1.0))
    scale = math.sqrt(f.d_head) if scale <= 0 else scale
    f.require(f.get("use_attn_scale", True) and math.isclose(scale, math.sqrt(f.d_head)),
              "a non-standard attention scale")
    if f.get("positional_embedding_type") == "rotary":
        return _hf_llama(f, sd, tokenizer)
    if f.get("positional_embedding_type") == "standard":
        return _hf_gpt2(f, sd, tokenizer)
    raise ModelLoadError(f"{source}: the Bridge backend cannot convert "
                         f"{f.get('positional_embedding_type')!r} positions")


@dataclass
class _HookedFields:
    fields: dict
    source: str

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            raise ModelLoadError(
                f"{self.source}: {what} cannot be converted for the Bridge backend; load it with "
                "backend='hooked'"
            )

    def __getattr__(self, key):
        if key in ("fields", "source"):
            raise AttributeError(key)
        return self.fields[key]


def _heads_out(w: Tensor) -> Tensor:
    """TL ``[head, d_model, d_head]`` -> ``nn.Linear`` weight ``[head * d_head, d_model]``."""
    return w.permute(0, 2, 1).reshape(-1, w.shape[1])


def _bias_free(f: _HookedFields, sd: dict, keys: list[str], what: str) -> None:
    f.require(all(k not in sd or not sd[k].any() for k in keys), what)


def _hf_llama(f: _HookedFields, sd: dict, tokenizer) -> nn.Module:
    import transformers

    n_kv = f.get("n_key_value_heads") or f.n_heads
    f.require(f.get("normalization_type") == "RMS" and f.get("final_rms", False),
              "a rotary model without RMSNorm")
    f.require(f.get("gated_mlp", False) and f.get("act_fn") == "silu", "a non-SwiGLU MLP")
    f.require(f.get("rotary_dim") in (None, f.d_head), "partial rotary")
    f.require(not f.get("use_NTK_by_parts_rope", False) and not f.get("use_yarn_rope", False),
              "rotary scaling")
    f.require(f.get("d_vocab_out", f.d_vocab) in (-1, f.d_vocab), "a separate output vocabulary")
    g = "_" if n_kv != f.n_heads else ""
    per_layer = [f"blocks.{i}.{k}" for i in range(f.n_layers)
                 for k in ("attn.b_Q", f"attn.{g}b_K", f"attn.{g}b_V", "attn.b_O",
                           "mlp.b_in", "mlp.b_out")]
    _bias_free(f, sd, per_layer, "non-zero attention or MLP biases")
    config = transformers.LlamaConfig(
        vocab_size=f.d_vocab, hidden_size=f.d_model, intermediate_size=f.d_mlp,
        num_hidden_layers=f.n_layers, num_attention_heads=f.n_heads, num_key_value_heads=n_kv,
        head_dim=f.d_head, max_position_embeddings=f.n_ctx, rms_norm_eps=f.get("eps", 1e-5),
        rope_theta=float(f.get("rotary_base", 10000)), hidden_act="silu",
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        **_special_ids(tokenizer),
    )
    perm = None
    if f.get("rotary_adjacent_pairs", False):
        half = torch.arange(0, f.d_head, 2)
        perm = torch.cat([half, half + 1])  # (0, 2, 4, ..., 1, 3, 5, ...)
    out = {"model.embed_tokens.weight": sd["embed.W_E"], "model.norm.weight": sd["ln_final.w"]}
    for i in range(f.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk = sd[b + "attn.W_Q"], sd[b + f"attn.{g}W_K"]
        if perm is not None:
            wq, wk = wq[..., perm], wk[..., perm]
        out |= {
            h + "input_layernorm.weight": sd[b + "ln1.w"],
            h + "post_attention_layernorm.weight": sd[b + "ln2.w"],
            h + "self_attn.q_proj.weight": _heads_out(wq),
            h + "self_attn.k_proj.weight": _heads_out(wk),
            h + "self_attn.v_proj.weight": _heads_out(sd[b + f"attn.{g}W_V"]),
            h + "self_attn.o_proj.weight": sd[b + "attn.W_O"].reshape(-1, f.d_model).T,
            h + "mlp.gate_proj.weight": sd[b + "mlp.W_gate"].T,
            h + "mlp.up_proj.weight": sd[b + "mlp.W_in"].T,
            h + "mlp.down_proj.weight": sd[b + "mlp.W_out"].T,
        }
    model = transformers.LlamaForCausalLM(config)
    return _load_converted(model, out, sd, f)


def _hf_gpt2(f: _HookedFields, sd: dict, tokenizer) -> nn.Module:
    import transformers

    act = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu"}.get(f.get("act_fn"))
    f.require(act is not None, f"activation {f.get('act_fn')!r}")
    f.require(f.get("normalization_type") == "LN" and not f.get("gated_mlp", False),
              "a standard-position model without LayerNorm or with a gated MLP")
    f.require(f.n_heads * f.d_head == f.d_model and not f.get("n_key_value_heads"),
              "a GPT-2-style model whose heads do not tile d_model")
    config = transformers.GPT2Config(
        vocab_size=f.d_vocab, n_positions=f.n_ctx, n_embd=f.d_model, n_layer=f.n_layers,
        n_head=f.n_heads, n_inner=f.d_mlp, activation_function=act,
        layer_norm_epsilon=f.get("eps", 1e-5), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=False, **_special_ids(tokenizer),
    )
    out = {"transformer.wte.weight": sd["embed.W_E"],
           "transformer.wpe.weight": sd["pos_embed.W_pos"],
           "transformer.ln_f.weight": sd["ln_final.w"],
           "transformer.ln_f.bias": sd["ln_final.b"]}
    for i in range(f.n_layers):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = [sd[b + f"attn.W_{x}"].permute(1, 0, 2).reshape(f.d_model, -1) for x in "QKV"]
        out |= {
            h + "ln_1.weight": sd[b + "ln1.w"], h + "ln_1.bias": sd[b + "ln1.b"],
            h + "ln_2.weight": sd[b + "ln2.w"], h + "ln_2.bias": sd[b + "ln2.b"],
            h + "attn.c_attn.weight": torch.cat(qkv, dim=1),
            h + "attn.c_attn.bias": torch.cat([sd[b + f"attn.b_{x}"].reshape(-1) for x in "QKV"]),
            h + "attn.c_proj.weight": sd[b + "attn.W_O"].reshape(-1, f.d_model),
            h + "attn.c_proj.bias": sd[b + "attn.b_O"],
            h + "mlp.c_fc.weight": sd[b + "mlp.W_in"],
            h + "mlp.c_fc.bias": sd[b + "mlp.b_in"],
            h + "mlp.c_proj.weight": sd[b + "mlp.W_out"],
            h + "mlp.c_proj.bias": sd[b + "mlp.b_out"],
        }
    model = transformers.GPT2LMHeadModel(config)
    return _load_converted(model, out, sd, f)


def _load_converted(model: nn.Module, out: dict, sd: dict, f: _HookedFields) -> nn.Module:
    """Load ``out`` plus the unembedding; an unembedding bias (GPT-2 zoo) gets a biased head."""
    out["lm_head.weight"] = sd["unembed.W_U"].T
    b_u = sd.get("unembed.b_U")
    if b_u is not None and b_u.any():
        model.lm_head = nn.Linear(f.d_model, f.d_vocab, bias=True)
        out["lm_head.bias"] = b_u
    missing, unexpected = model.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith(("rotary_emb.inv_freq", "attn.bias",
                                                     "attn.masked_bias"))]
    if missing or unexpected:
        raise ModelLoadError(f"{f.source}: converted weights do not fit: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return model.eval()


def _special_ids(tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
