"""rh_lens: retrieval heads, measured with TransformerLens.

The public API is re-exported here and imported lazily, so that ``import rh_lens`` (and the
torch-free modules such as :mod:`rh_lens.properties`) start without loading torch and
TransformerLens.  Submodules whose names start with ``_`` are private.
"""

import importlib

_EXPORTS = {
    "ContextTooLongError": "rh_lens.errors",
    "ModelLoadError": "rh_lens.errors",
    "RhLensError": "rh_lens.errors",
    "KVState": "rh_lens.models",
    "ModelFacts": "rh_lens.models",
    "check_context": "rh_lens.models",
    "forward_chunk": "rh_lens.models",
    "load_model": "rh_lens.models",
    "model_facts": "rh_lens.models",
    "new_kv_state": "rh_lens.models",
    "save_model_dir": "rh_lens.models",
    "tokenize": "rh_lens.models",
    "tokenize_with_offsets": "rh_lens.models",
    "zoo_names": "rh_lens.models",
    "Needle": "rh_lens.niah",
    "build_trial": "rh_lens.niah",
    "DetectConfig": "rh_lens.detect",
    "DetectResult": "rh_lens.detect",
    "compute_detect": "rh_lens.detect",
    "decode_greedy": "rh_lens.decode",
    "load_result": "rh_lens.results",
    "import_reference_json": "rh_lens.results",
    "export_reference_json": "rh_lens.results",
    "load_head_scores": "rh_lens.properties",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "hooks":
        return importlib.import_module("rh_lens.hooks")
    raise AttributeError(f"module 'rh_lens' has no attribute {name!r}")


def __dir__():
    return sorted([*__all__, "hooks"])
