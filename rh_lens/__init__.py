"""rh_lens: retrieval heads, measured with TransformerLens.

The public API is re-exported here; submodules whose names start with ``_`` are private.
"""

from rh_lens.models import (
    ContextTooLongError,
    KVState,
    ModelFacts,
    ModelLoadError,
    check_context,
    forward_chunk,
    load_model,
    model_facts,
    new_kv_state,
    save_model_dir,
    tokenize,
)

__all__ = [
    "ContextTooLongError",
    "KVState",
    "ModelFacts",
    "ModelLoadError",
    "check_context",
    "forward_chunk",
    "load_model",
    "model_facts",
    "new_kv_state",
    "save_model_dir",
    "tokenize",
]
__version__ = "0.1.0"
