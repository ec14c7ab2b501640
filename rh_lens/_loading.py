"""What every model loader shares: which engines this transformer-lens has, quiet loading,
building a HookedTransformer from a state dict, and the check on extending a context window.

Private to :mod:`rh_lens.models` and its loaders (:mod:`rh_lens._bridge`, :mod:`rh_lens._hf_dir`,
:mod:`rh_lens._llama2c`); it imports none of them, so the loaders and the module that picks among
them never import each other.
"""

import contextlib
import os

from torch import Tensor

from rh_lens.errors import ModelLoadError

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    HAS_HOOKED = True
except ImportError:  # transformer-lens 4.x: the Bridge is the only engine

    class HookedTransformer:  # type: ignore[no-redef]
        """Placeholder: this transformer-lens has no HookedTransformer."""

    class HookedTransformerConfig:  # type: ignore[no-redef]
        """Placeholder: this transformer-lens has no HookedTransformerConfig."""

    HAS_HOOKED = False

# Causal-LM architectures whose Hugging Face weights TransformerLens 3.x converts.
SUPPORTED_ARCHITECTURES = (
    "GPT2LMHeadModel",
    "GPTNeoForCausalLM",
    "GPTNeoXForCausalLM",
    "GPTJForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
)


@contextlib.contextmanager
def quiet_loading():
    """Silence TransformerLens's per-load banner and deprecation notes; errors still raise."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*deprecated.*")
            with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
                yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_model(
    cfg: HookedTransformerConfig, state_dict: dict[str, Tensor], tokenizer
) -> HookedTransformer:
    """A HookedTransformer from a config and an unprocessed TransformerLens state dict."""
    from transformer_lens.loading_from_pretrained import fill_missing_keys

    # TL's set_tokenizer reads init_kwargs["name_or_path"], absent from in-memory tokenizers.
    tokenizer.init_kwargs.setdefault("name_or_path", tokenizer.name_or_path)
    with quiet_loading():
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        # Converters omit biases the architecture does not have (GPT-2's unembed bias): TL
        # fills those with zeros, and the remaining check below still catches real gaps.
        state_dict = fill_missing_keys(model, state_dict)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Rotary tables, masks and IGNORE constants are buffers TL rebuilds itself.
    missing = [k for k in missing if not is_rebuilt_buffer(k)]
    if missing or unexpected:
        raise ModelLoadError(
            f"weights do not fit the model config: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    with quiet_loading():
        return model.to(cfg.device)


def is_rebuilt_buffer(key: str) -> bool:
    """Whether ``key`` names a buffer TransformerLens rebuilds itself (never stored)."""
    return key.rsplit(".", 1)[-1] in {"mask", "IGNORE", "rotary_sin", "rotary_cos"}


def require_rotary(positional: str | None, trained: int, wanted: int, source) -> None:
    """Refuse to extend a context window past ``trained`` unless positions are rotary."""
    if wanted > trained and positional != "rotary":
        raise ModelLoadError(
            f"{source}: n_ctx={wanted} exceeds the trained context {trained}, and only rotary "
            f"models can be extended (this one uses {positional!r} positions)"
        )


ATTENTION_MATRICES = {  # name -> the order of its dimensions in which F.linear reads it
    "W_Q": (0, 2, 1), "W_K": (0, 2, 1), "W_V": (0, 2, 1), "_W_K": (0, 2, 1), "_W_V": (0, 2, 1),
    "W_O": (2, 0, 1),
}


def store_for_linear(model: HookedTransformer, *, attention: bool = True) -> HookedTransformer:
    """Store each matrix that TransformerLens hands to ``F.linear`` in the layout ``F.linear``
    reads, so that the copy TransformerLens makes of it on every forward (``W_U.T.contiguous()``,
    a gated MLP's transposed matrices, the rearranged ``W_Q`` ... ``W_O``) is a view instead.

    The values and the tensor that reaches ``F.linear`` are the same, in the same layout, so
    every result is bit for bit what it was, and a forward no longer copies its weights (at a
    7B shape, half a gigabyte a layer in float32, with a strided read).  The parameters keep
    their shapes and names; only their strides change.  ``attention=False`` gives the attention
    matrices TransformerLens's own layout back (see :func:`attention_layout`).
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rpartition(".")[2]
            if leaf in ATTENTION_MATRICES:
                order = ATTENTION_MATRICES[leaf] if attention else (0, 1, 2)
                inverse = [order.index(i) for i in range(3)]
                param.data = param.data.permute(*order).contiguous().permute(*inverse)
            elif leaf == "W_U" or (leaf in ("W_in", "W_gate", "W_out") and model.cfg.gated_mlp):
                param.data = param.data.T.contiguous().T
    return model


def attention_layout(model: HookedTransformer, flags: dict[str, bool]) -> None:
    """The attention matrices' layout for TransformerLens's hook flags: with split inputs or
    per-head results on, TransformerLens reads them through ``einsum``, whose rounding depends
    on their layout, so they get TransformerLens's own; otherwise the ``F.linear`` layout."""
    split = any(flags.get(name) for name in ("use_split_qkv_input", "use_attn_result"))
    store_for_linear(model, attention=not split)
