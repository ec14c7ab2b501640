"""The same weights under both engines: a loaded model as a Hugging Face ``LlamaForCausalLM``,
and a Hugging Face Llama model as a ``HookedTransformer``.

- :func:`to_hf`: a HookedTransformer of a Llama-style model (the zoo's Llama family, llama2.c,
  any RMSNorm + SwiGLU + rotary model) becomes the Hugging Face model that computes the same
  logits (a converted copy, in the model's dtype); a TransformerBridge loaded with the SDPA fast
  prefill hands out its SDPA twin, the plain Hugging Face model on the bridge's own parameters.
- :func:`hooked_from_hf`: a Hugging Face Llama model becomes the HookedTransformer that computes
  the same logits, either on views of the Hugging Face tensors (no second copy) or on its own
  contiguous copies in TransformerLens's layout, as :func:`rh_lens.models.load_model` gives.

The Hugging Face side is what :mod:`rh_lens.reference_method` runs on.
"""

import torch
from torch import Tensor, nn

from rh_lens import _bridge
from rh_lens._loading import (
    HookedTransformer,
    HookedTransformerConfig,
    quiet_loading,
    store_for_linear,
)
from rh_lens.engine import backend_of, require_hooked
from rh_lens.errors import ModelLoadError

__all__ = ["hooked_from_hf", "to_hf"]


def to_hf(model) -> nn.Module:
    """The Hugging Face causal LM with ``model``'s weights, in eval mode, on its device.

    A HookedTransformer is converted (weights copied; TransformerLens's folded RMSNorm, from
    ``from_pretrained`` with processing, becomes unit norm weights).  A TransformerBridge must
    have been loaded with ``fast_prefill`` (the default): its SDPA twin shares every parameter.
    """
    backend = backend_of(model)
    if backend == "bridge":
        twin = model.__dict__.get(_bridge.TWIN_ATTR)
        if twin is None:
            raise ModelLoadError("to_hf of a TransformerBridge needs the model loaded with "
                                 "fast_prefill=True (its SDPA twin is the Hugging Face model)")
        twin.tie()
        return twin.model
    if backend != "hooked":
        raise ValueError(f"to_hf needs a HookedTransformer or a TransformerBridge, got "
                         f"{type(model).__name__}")
    from rh_lens.models import _config_to_json

    fields = _config_to_json(model.cfg)
    state = {k: v for k, v in model.state_dict().items()}
    if fields.get("normalization_type") == "RMSPre":  # weights folded into the next matrices
        ones = torch.ones(model.cfg.d_model)
        state |= {f"blocks.{i}.{n}.w": ones for i in range(model.cfg.n_layers)
                  for n in ("ln1", "ln2")} | {"ln_final.w": ones}
        fields |= {"normalization_type": "RMS", "final_rms": True}
    hf = _bridge.hf_from_hooked(fields, state, model.tokenizer, source=model.cfg.model_name)
    return hf.to(device=model.cfg.device, dtype=model.cfg.dtype).eval()


def _heads_in(w: Tensor, n: int) -> Tensor:
    """``nn.Linear`` weight ``[n * d_head, d_model]`` -> TL ``[n, d_model, d_head]`` (a view)."""
    return w.view(n, -1, w.shape[1]).transpose(1, 2)


def hooked_from_hf(hf_model: nn.Module, tokenizer, *, n_ctx: int | None = None,
                   share: bool = True, name: str | None = None) -> HookedTransformer:
    """The HookedTransformer computing what the Hugging Face Llama model ``hf_model`` does.

    ``share=True``: its parameters are views of ``hf_model``'s (no memory of its own beyond
    zero biases and rotary tables).  ``share=False``: copies of its own, in the layout
    :func:`rh_lens.models.load_model` gives a loaded model (each matrix stored as ``F.linear``
    reads it; see :func:`rh_lens._loading.store_for_linear`).  Token embeddings are shared
    either way.
    """
    require_hooked("hooked_from_hf")
    c = hf_model.config
    if type(hf_model).__name__ != "LlamaForCausalLM":
        raise ModelLoadError(f"hooked_from_hf converts LlamaForCausalLM only, got "
                             f"{type(hf_model).__name__}")
    if getattr(c, "rope_scaling", None) and c.rope_scaling.get("rope_type", "default") != "default":
        raise ModelLoadError("hooked_from_hf: rotary scaling is not converted")
    first = hf_model.model.embed_tokens.weight
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_layers=c.num_hidden_layers,
        n_ctx=n_ctx or c.max_position_embeddings, n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size,
        d_vocab=c.vocab_size, act_fn="silu", normalization_type="RMS", final_rms=True,
        positional_embedding_type="rotary", rotary_dim=d_head, rotary_base=float(theta),
        gated_mlp=True, eps=c.rms_norm_eps, original_architecture="LlamaForCausalLM",
        init_weights=False, dtype=first.dtype, device=str(first.device),
        model_name=name or getattr(c, "name_or_path", "") or "hf-llama",
    )
    tokenizer.init_kwargs.setdefault("name_or_path", tokenizer.name_or_path)
    with quiet_loading():  # init_weights=False: empty tensors, replaced below
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    views = _views(hf_model, cfg)
    keep = (lambda t: t) if share else (lambda t: t.contiguous())
    names = {n for n, _ in model.named_parameters()}
    missing = sorted(set(views) - names)
    if missing:
        raise ModelLoadError(f"hooked_from_hf: TransformerLens has no {missing[:5]}")
    for pname in sorted(names):
        module_name, _, leaf = pname.rpartition(".")
        module = model.get_submodule(module_name)
        if pname in views:
            tensor = views[pname] if pname == "embed.W_E" else keep(views[pname])
        else:  # biases the architecture does not have
            tensor = torch.zeros(module._parameters[leaf].shape, dtype=first.dtype,
                                 device=first.device)
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    with quiet_loading():
        model.to(first.device)  # the buffers (rotary tables); parameters are there already
    return store_for_linear(model).eval()


def _views(hf_model: nn.Module, cfg) -> dict[str, Tensor]:
    """TransformerLens parameter name -> the view of the Hugging Face tensor it equals."""
    m = hf_model.model
    n_kv = cfg.n_key_value_heads
    g = "_" if n_kv != cfg.n_heads else ""
    out = {"embed.W_E": m.embed_tokens.weight.detach(),
           "ln_final.w": m.norm.weight.detach(),
           "unembed.W_U": hf_model.lm_head.weight.detach().T}
    for i, layer in enumerate(m.layers):
        a, p = layer.self_attn, f"blocks.{i}."
        out |= {
            p + "ln1.w": layer.input_layernorm.weight.detach(),
            p + "ln2.w": layer.post_attention_layernorm.weight.detach(),
            p + "attn.W_Q": _heads_in(a.q_proj.weight.detach(), cfg.n_heads),
            p + f"attn.{g}W_K": _heads_in(a.k_proj.weight.detach(), n_kv),
            p + f"attn.{g}W_V": _heads_in(a.v_proj.weight.detach(), n_kv),
            p + "attn.W_O": a.o_proj.weight.detach().T.view(cfg.n_heads, cfg.d_head, -1),
            p + "mlp.W_in": layer.mlp.up_proj.weight.detach().T,
            p + "mlp.W_gate": layer.mlp.gate_proj.weight.detach().T,
            p + "mlp.W_out": layer.mlp.down_proj.weight.detach().T,
        }
    return out
