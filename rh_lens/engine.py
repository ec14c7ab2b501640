"""The narrow surface through which rh_lens drives a loaded model, on either engine.

The rest of the package reaches a model only through what is defined here (model facts,
tokenization without truncation, the optional hook points, a forward of one chunk against a
key/value cache) plus the model's own ``hooks()`` and ``run_with_cache`` and the hook names of
:mod:`rh_lens.hooks`.  Both engines offer all of it: a ``HookedTransformer`` (transformer-lens 3.x)
and a ``TransformerBridge`` around the Hugging Face model (:mod:`rh_lens._bridge` holds the
Bridge's side).  :mod:`rh_lens.models` loads the models and re-exports these names.
"""

import contextlib
import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from rh_lens import _bridge, _hooked_step, hooks
from rh_lens._loading import HAS_HOOKED, HookedTransformer
from rh_lens.errors import ContextTooLongError, ModelLoadError, RhLensError

Backend = Literal["hooked", "bridge"]
BACKENDS = ("hooked", "bridge")
DEFAULT_BACKEND: Backend = "hooked" if HAS_HOOKED else "bridge"
Model = HookedTransformer | TransformerBridge

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "HAS_HOOKED",
    "KVState",
    "Model",
    "ModelFacts",
    "attached",
    "backend_of",
    "check_context",
    "forward_argmax",
    "forward_chunk",
    "forward_reads",
    "model_facts",
    "new_kv_state",
    "require_hooked",
    "select_rows",
    "set_hook_flags",
    "tokenize",
    "tokenize_with_offsets",
    "weights_fingerprint",
]


@dataclass(frozen=True)
class ModelFacts:
    """What an analysis needs to know about a model's shape, read from ``model.cfg``."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    n_ctx: int
    positional: str

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads


def backend_of(model: Any) -> Backend | None:
    """``"bridge"`` for a TransformerBridge, ``"hooked"`` for a HookedTransformer, else None."""
    if _bridge.is_bridge(model):
        return "bridge"
    return "hooked" if HAS_HOOKED and isinstance(model, HookedTransformer) else None


def weights_fingerprint(model: Any) -> str:
    """A short digest of the loaded parameters (each one's name, shape, and float64 sum, sum of
    squares, first and last element), stored with resumable sweeps so that a rerun never mixes
    the results of two weight sets saved under one name (a retrained zoo model, an updated
    checkpoint).  One reduction per parameter, on the model's device.  The parameters are the
    loaded ones, so the backend and TransformerLens's weight processing are part of it."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            flat = param.detach().reshape(-1).double()
            stats = torch.stack([flat.sum(), (flat * flat).sum(), flat[0], flat[-1]]).tolist()
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(" ".join(f"{v:.9g}" for v in stats).encode())
    return digest.hexdigest()[:16]


def model_facts(model: Model) -> ModelFacts:
    cfg = model.cfg
    return ModelFacts(
        name=cfg.model_name,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
        d_head=cfg.d_head,
        d_model=cfg.d_model,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        positional=cfg.positional_embedding_type,
    )


# --------------------------------------------------------------------------------------------
# Tokenization and the forward step


def tokenize(
    model: Model, text: str, *, prepend_bos: bool | None = None
) -> Int[Tensor, " pos"]:
    """Token ids of ``text``, never truncated (TransformerLens truncates to ``n_ctx`` silently)."""
    return tokenize_with_offsets(model, text, prepend_bos=prepend_bos)[0]


def tokenize_with_offsets(
    model: Model, text: str, *, prepend_bos: bool | None = None
) -> tuple[Int[Tensor, " pos"], list[tuple[int, int]]]:
    """Token ids and the ``(start, end)`` character span of each token in ``text``.

    A prepended BOS token gets the empty span ``(0, 0)``.  ``prepend_bos`` defaults to the
    model's ``cfg.default_prepend_bos``.
    """
    tok = model.tokenizer
    if tok is None:
        raise ModelLoadError(f"model {model.cfg.model_name!r} has no tokenizer")
    if prepend_bos is None:
        prepend_bos = model.cfg.default_prepend_bos
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if prepend_bos:
        ids = [tok.bos_token_id, *ids]
        offsets = [(0, 0), *offsets]
    return torch.tensor(ids, dtype=torch.long), offsets


_BRIDGE_FLAG_SETTERS = {
    "use_split_qkv_input": "set_use_split_qkv_input",
    "use_hook_mlp_in": "set_use_hook_mlp_in",
    "use_attn_result": "set_use_attn_result",
}


def set_hook_flags(model: Model, flags: dict[str, bool]) -> dict[str, bool]:
    """Switch TransformerLens's optional hook points (``use_split_qkv_input``,
    ``use_hook_mlp_in``, ``use_attn_result``, ``ungroup_grouped_query_attention``) and return
    their previous values, for a second call that restores them.

    A Bridge switches them through its own setters (they reach every attention component); it
    has no ungrouped keys/values, so asking for those there is an error, not a silent no-op.
    """
    cfg = model.cfg
    saved = {name: bool(getattr(cfg, name, False)) for name in flags}
    bridge = _bridge.is_bridge(model)
    for name, value in flags.items():  # refuse before changing anything
        if bridge and name not in _BRIDGE_FLAG_SETTERS and bool(value) != saved[name]:
            raise RhLensError(
                f"{name} is not available on backend='bridge': the Bridge runs Hugging Face's "
                "attention, which reads keys and values per KV head; per-query-head key/value "
                "receivers of a grouped-query model need backend='hooked' (query, MLP and direct "
                "receivers work on both)"
            )
    for name, value in flags.items():
        if not bridge:
            setattr(cfg, name, value)
        elif name in _BRIDGE_FLAG_SETTERS:
            getattr(model, _BRIDGE_FLAG_SETTERS[name])(value)
    if not bridge:
        from rh_lens._loading import attention_layout

        attention_layout(model, {name: getattr(cfg, name, False) for name in
                                 ("use_split_qkv_input", "use_attn_result")})
    return saved


def require_hooked(what: str, *, alternative: str = "") -> None:
    """Raise :class:`ModelLoadError` naming ``what`` when this transformer-lens (4.x) has no
    HookedTransformer."""
    if not HAS_HOOKED:
        raise ModelLoadError(
            f"{what} needs transformer-lens 3.x (this one has no HookedTransformer); "
            f"{alternative}install 'transformer-lens>=3.9,<4'"
        )


def check_context(model: Model, n_tokens: int, *, what: str = "prompt") -> None:
    """Raise :class:`ContextTooLongError` when ``n_tokens`` exceeds the model's ``n_ctx``."""
    n_ctx = model.cfg.n_ctx
    if n_tokens > n_ctx:
        raise ContextTooLongError(
            f"{what} has {n_tokens} tokens but model {model.cfg.model_name!r} has n_ctx={n_ctx}; "
            f"use shorter contexts or load the model with load_model(..., n_ctx={n_tokens}) "
            "(rotary models only; quality beyond the trained length is not guaranteed)"
        )


@dataclass
class KVState:
    """Keys and values of everything forwarded so far, for one batch of sequences.

    ``mask`` is the attention mask of those ``n_tokens`` columns (``[batch, n_tokens]``, 0 at
    the left padding of a batch of prompts of different lengths); None while every column is
    a real token.
    """

    cache: Any
    n_tokens: int = 0
    mask: Int[Tensor, "batch n_tokens"] | None = None


def new_kv_state(model: Model, batch: int = 1) -> KVState:
    if _bridge.is_bridge(model):
        return KVState(_bridge.new_cache(model, batch))
    from transformer_lens import TransformerLensKeyValueCache

    return KVState(TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch))


def forward_chunk(
    model: Model, tokens: Int[Tensor, "batch pos"], state: KVState,
    attention_mask: Int[Tensor, "batch pos"] | None = None, *, logits: bool = True,
    last_only: bool = False,
) -> Float[Tensor, "batch logit_pos d_vocab"] | None:
    """Forward ``tokens`` after everything already in ``state`` and append their keys/values.

    ``logits=False`` (a prefill chunk whose predictions nobody reads) returns None and skips
    the unembedding where the engine allows: at a vocabulary of 128K words it costs more than
    a few layers.  ``last_only`` returns the last position's logits alone.

    ``attention_mask`` (default all ones) marks the real tokens of ``tokens``; a batch of
    prompts of different lengths is left-padded, with 0 at the padding.  Both engines get the
    whole mask explicitly and position ids counted over real tokens only, so a padded row
    computes what it computes alone: with a cache, TransformerLens would otherwise build the
    mask from ``tokenizer.pad_token_id`` and silently mask real tokens with that id, and Hugging
    Face would number positions by column.  A Bridge with the fast prefill forwards a
    multi-token chunk with Hugging Face's SDPA kernels when no hook is attached (see
    :mod:`rh_lens._bridge`).
    """
    return _forward(model, tokens, state, attention_mask, argmax=False, logits=logits,
                    last_only=last_only)[0]


def forward_argmax(
    model: Model, tokens: Int[Tensor, "batch pos"], state: KVState,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"], Int[Tensor, "batch n_layers n_heads"]]:
    """:func:`forward_chunk`, and for every layer and head the key column of the largest
    attention weight of each row's last query (left padding never is one: its weight is 0).

    No hook at all when none is attached: a Llama-family HookedTransformer then runs its own
    operations without the module machinery (:mod:`rh_lens._hooked_step`), a Bridge with the
    fast path an eager twin that returns the attention weights itself; otherwise one hook per
    layer, reducing all heads at once.
    """
    logits, table, _ = _forward(model, tokens, state, attention_mask, argmax=True)
    return logits, table


def forward_reads(
    model: Model, tokens: Int[Tensor, "batch pos"], state: KVState,
    attention_mask: Int[Tensor, "batch pos"] | None = None, *,
    spans: Int[Tensor, "batch 2"] | None = None, last_only: bool = False,
) -> tuple[Float[Tensor, "batch logit_pos d_vocab"], Int[Tensor, "batch n_layers n_heads"],
           Float[Tensor, "batch n_layers n_heads"] | None]:
    """:func:`forward_argmax`, and with ``spans`` (key columns ``[start, end)`` of each row,
    padding included) the attention mass of each row's last query on its span, for every
    layer and head (:func:`rh_lens.scoring.span_mass`), read in the same reduction.
    ``last_only`` returns the logits of the last position alone (``[batch, 1, d_vocab]``;
    where the engine allows, the others are never computed)."""
    return _forward(model, tokens, state, attention_mask, argmax=True, spans=spans,
                    last_only=last_only)


def reads_whole_chunks(model: Model) -> bool:
    """Whether :func:`forward_reads` of a chunk of many tokens costs about what a forward
    without reading does here: on a HookedTransformer that takes the lean forward, which
    builds the whole attention pattern either way, and on a Llama Bridge with the fast path,
    whose SDPA prefill reads the last query's weights (``last_only``).  Decoding then forwards
    a prompt's last token with its last chunk instead of as a step of its own."""
    if _bridge.is_bridge(model):
        return _bridge.reads_whole_chunks(model)
    return backend_of(model) == "hooked" and _lean(model, 0)


def _forward(model, tokens, state, attention_mask, *, argmax, logits=True, spans=None,
             last_only=False):
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    check_context(model, state.n_tokens + tokens.shape[1], what="sequence")
    device = model.cfg.device
    tokens = tokens.to(device)
    if attention_mask is not None and state.mask is None and not bool(attention_mask.all()):
        state.mask = torch.ones((tokens.shape[0], state.n_tokens), dtype=torch.long,
                                device=device)
    if state.mask is not None:
        new = (torch.ones_like(tokens) if attention_mask is None
               else attention_mask.to(device=device, dtype=torch.long))
        state.mask = torch.cat([state.mask, new], dim=1)
    bridge = _bridge.is_bridge(model)
    new = None if bridge else (torch.ones_like(tokens) if state.mask is None
                               else state.mask[:, state.n_tokens :])  # the chunk's own mask
    if not bridge and _lean(model, state.n_tokens + tokens.shape[1]):
        out, table, mass = _hooked_step.forward(model, tokens, state.cache, new, logits=logits,
                                                argmax=argmax, spans=spans, last_only=last_only)
        state.n_tokens += tokens.shape[1]
        return out, table, mass
    unhooked = bridge and not _bridge.hooks_attached(model)  # one scan a forward
    recorder = None
    if argmax and not (unhooked and _bridge.has_eager_twin(model)):
        recorder = hooks.LastQueryArgmax(model.cfg.n_layers, spans=spans)
    mass = None
    with attached(model, recorder.hooks if recorder else []):
        if bridge:
            out, table, mass = _bridge.forward_chunk(
                model, tokens, state.cache, state.n_tokens, state.mask, argmax=argmax,
                logits=logits, spans=spans, unhooked=unhooked and recorder is None,
                last_only=last_only)
        else:
            out = model(tokens, past_kv_cache=state.cache, attention_mask=new,
                        return_type="logits" if logits else None)
            table = None
    state.n_tokens += tokens.shape[1]
    out = (out[:, -1:] if last_only else out) if logits else None
    if recorder is not None:
        return out, recorder.table(), recorder.mass_table()
    return out, table, mass


def _lean(model: Model, n_keys: int) -> bool:
    """Whether a HookedTransformer forward can skip the module machinery
    (:mod:`rh_lens._hooked_step`, bit for bit the same): a configuration it reproduces, no hook
    attached anywhere, and rotary tables long enough for ``n_keys`` positions (TransformerLens
    extends them itself)."""
    return (_hooked_step.supports(model) and n_keys <= model.blocks[0].attn.rotary_cos.shape[0]
            and _hooked_step.unhooked(model))


def select_rows(model: Model, state: KVState, rows: Int[Tensor, " keep"]) -> None:
    """Keep only batch rows ``rows`` of ``state`` (sequences that finished leave the batch)."""
    rows = rows.to(model.cfg.device)
    if state.mask is not None:
        state.mask = state.mask.index_select(0, rows)
    if _bridge.is_bridge(model):
        _bridge.select_rows(state.cache, rows)
        return
    _hooked_step.select_rows(state.cache, rows)


# --------------------------------------------------------------------------------------------
# Hooks attached without the engines' per-call bookkeeping

_LEVELS = itertools.count(1 << 30)  # hook levels of their own, apart from TL's context levels


def hook_points(model: Model) -> dict[str, Any]:
    """Every canonical hook name of ``model`` -> its hook point (for a Bridge, resolved once:
    its ``hook_dict`` is rebuilt, aliases and all, on every access)."""
    return _bridge.hook_points(model) if _bridge.is_bridge(model) else model.hook_dict


@contextlib.contextmanager
def attached(model: Model, fwd_hooks: Sequence[tuple[str, Callable]]) -> Iterator[None]:
    """``model.hooks(fwd_hooks=...)`` for hooks given by canonical name (a Bridge's aliases
    are not resolved), at a fraction of its cost per call: it touches only the named hook
    points and removes exactly the hooks it added, leaving every other hook (a caller's, an
    outer context's) in place."""
    points = hook_points(model)
    unknown = [name for name, _ in fwd_hooks if name not in points]
    if unknown:
        raise ValueError(f"model {model.cfg.model_name!r} has no hook point {unknown[0]!r}")
    level = next(_LEVELS)
    added = []
    try:
        for name, fn in fwd_hooks:
            point = points[name]
            point.add_hook(fn, dir="fwd", level=level)
            added.append(point)
        yield
    finally:
        for point in added:
            point.remove_hooks("fwd", level=level)
