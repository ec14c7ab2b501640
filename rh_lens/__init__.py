"""rh_lens: retrieval heads, measured with TransformerLens.

Everything a notebook or script needs is here, ``import rh_lens as rl``:

- models: :func:`load_model` and the narrow surface the analyses use (:func:`model_facts`,
  :func:`tokenize`, :func:`new_kv_state`, :func:`forward_chunk`, :func:`decode_greedy`);
- heads: :class:`Head`, :func:`label`, :func:`select_heads` (``top:K``, ``random:K``, ...),
  :data:`THRESHOLD`; hook names in :mod:`rl.hooks`, interventions in :mod:`rl.interventions`;
- inputs: :class:`Needle`, :func:`build_trial`, :func:`read_needles`,
  :func:`haystack_from_folder`, and the zoo's (:func:`zoo_inputs`, :func:`zoo_pairs`,
  :func:`zoo_tasks`, :func:`zoo_chain`);
- analyses, each a ``compute_*`` returning a result that saves and loads itself: detection
  (:func:`compute_detect`, with the attention scores of :mod:`rl.qr`), properties
  (:class:`HeadScores`, :func:`compute_property_summary`, :func:`compute_score_comparison`),
  ablation (:func:`compute_ablation`), patching (:func:`compute_activation_patching`,
  :func:`compute_path_patching`), chain of thought (:func:`compute_cot`), training dynamics
  over a :class:`CheckpointSeries` (:func:`compute_dynamics`, :func:`induction_scores`),
  detection across precisions (:func:`compute_precision`), key/value-cache compression by head
  (:func:`compute_kv_compress`, :class:`KVPolicy`);
- head files of other methods: DuoAttention's gates (:func:`read_duo_tsv`,
  :func:`write_duo_tsv`) and QRHead's head sets (:func:`read_qrhead_yaml`,
  :func:`write_qrhead_yaml`, :func:`head_set_table`);
- figures: :mod:`rl.plotting` (every ``plot_*`` returns a plotly figure);
- the same weights in Hugging Face Transformers (:func:`to_hf`, :func:`hooked_from_hf`) and the
  reference implementation's decoding method on them (:func:`reference_detect`,
  :func:`hf_greedy`).

Names are imported on first use, so ``import rh_lens`` (and the torch-free modules such as
:mod:`rh_lens.properties`) start without loading torch and TransformerLens.  Submodules whose
names start with ``_`` are private.
"""

import importlib

_MODULES = {
    "rh_lens.errors": ("ContextTooLongError", "ModelLoadError", "RhLensError"),
    "rh_lens.models": ("load_model", "save_model_dir", "zoo_names"),
    "rh_lens.engine": ("KVState", "ModelFacts", "check_context", "forward_chunk", "model_facts",
                       "new_kv_state", "tokenize", "tokenize_with_offsets",
                       "weights_fingerprint"),
    "rh_lens.decode": ("decode_greedy",),
    "rh_lens.hf_export": ("hooked_from_hf", "to_hf"),
    "rh_lens.reference_method": ("hf_greedy", "reference_detect"),
    "rh_lens.heads": ("THRESHOLD", "Head", "bottom_heads", "kv_group", "label",
                      "matched_head_draws", "parse_spec", "random_head_draws",
                      "ranked_heads", "select_heads", "top_heads"),
    "rh_lens.niah": ("Needle", "TextHaystack", "build_trial", "haystack_from_folder",
                     "read_needles"),
    "rh_lens.zoo.inputs": ("ZooTaskSizes", "zoo_chain", "zoo_inputs", "zoo_pairs",
                           "zoo_tasks"),
    "rh_lens.store": ("SweepStore",),
    "rh_lens.results": ("RunMetadata", "export_reference_json", "import_reference_json",
                        "load_result"),
    "rh_lens.detect": ("DetectConfig", "DetectResult", "compute_detect"),
    "rh_lens.qr": ("NULL_QUESTION", "prompt_spans", "qr_scores", "question_mass"),
    "rh_lens.properties": ("HeadScores", "PropertySummary", "compute_activation",
                           "ScoreComparison", "compute_correlation_matrix", "compute_groups",
                           "compute_intrinsic", "compute_property_summary",
                           "compute_score_comparison", "compute_sparsity", "compute_stability",
                           "compute_switch_on", "compute_threshold_sweep",
                           "compute_universality", "load_head_scores"),
    "rh_lens.headfiles": ("head_set_table", "read_duo_tsv", "read_qrhead_yaml",
                          "write_duo_tsv", "write_qrhead_yaml"),
    "rh_lens.kvcache": ("KVPolicy", "cache_bytes", "decode_kv_policy_slow", "kept_positions",
                        "kv_policies", "matched_window", "policy_hooks"),
    "rh_lens.kvcache.sweep": ("compute_kv_compress",),
    "rh_lens.ablation": ("AblationConfig", "AblationResult", "Condition", "compute_ablation",
                         "conditions_from_masks"),
    "rh_lens.patching": ("PatchConfig", "PatchingResult", "compute_activation_patching",
                         "compute_path_patching", "head_receivers", "make_pair"),
    "rh_lens.cot": ("CotConfig", "CotResult", "Task", "compute_cot", "read_items"),
    "rh_lens.series": ("Checkpoint", "CheckpointSeries", "parse_series"),
    "rh_lens.induction": ("InductionConfig", "induction_scores"),
    "rh_lens.dynamics": ("DynamicsConfig", "DynamicsResult", "compute_dynamics"),
    "rh_lens.precision": ("PrecisionResult", "compute_precision"),
}
_SUBMODULES = ("benchmark", "headfiles", "heads", "hooks", "interventions", "kvcache",
               "plotting", "qr", "store")
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted([*_EXPORTS, *_SUBMODULES])
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"rh_lens.{name}")
    raise AttributeError(f"module 'rh_lens' has no attribute {name!r}")


def __dir__():
    return list(__all__)
