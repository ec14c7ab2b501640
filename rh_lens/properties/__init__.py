"""The paper's properties of retrieval heads, from detection results and released score files.

Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality" (sections 1 and 4):
retrieval heads are *universal* (every model has heads with mean score > 0.1), *sparse* (few
heads), *intrinsic* (base and derived models share them: per-head scores correlate) and
*dynamically activated* (some heads copy in every successful trial, "always-on"; the others
depend on the context).

Input is a :class:`HeadScores` (per-trial scores of the successful trials), read by
:func:`load_head_scores` from an rh_lens detection directory (``python -m analyses.detect``) or a
reference-format ``{"layer-head": [score per trial]}`` file.  Definitions used throughout:

- a head's *retrieval score* is its mean over successful trials; a *retrieval head* has a score
  strictly above ``threshold`` (0.1);
- score bins are ``=0``, ``(0, 0.1]``, ``(0.1, 0.5]``, ``(0.5, inf)``: the paper's top bin is
  ``(0.5, 1]``, but the reference's step score can exceed 1 (Qwen1.5-14B has a head at 1.003);
- a detection directory may hold other scores of the same trials (``mass``, ``qr``): they are
  compared with the model's score as two models are (:mod:`~rh_lens.properties.kinds`);
- a head is *active* in a trial when it copied at least one token (rh_lens: ``trial_active``;
  reference file: score > 0, which is the same for step and set scores); its *activation
  frequency* is the share of successful trials in which it was active; *always-on* means
  frequency exactly 1, and ``level`` (0.95) gives a looser list; *context-dependent* heads are
  retrieval heads with frequency < 1;
- which context (needle, length, depth) switches a head on needs the per-trial cells, which only
  rh_lens directories hold (``trials.jsonl``); reference files carry no context.

One module per property: :mod:`~rh_lens.properties.scores` (the input),
:mod:`~rh_lens.properties.sparsity`, :mod:`~rh_lens.properties.activation`,
:mod:`~rh_lens.properties.switch_on`, :mod:`~rh_lens.properties.universality`,
:mod:`~rh_lens.properties.kinds` (the scores of one model),
:mod:`~rh_lens.properties.intrinsic`, :mod:`~rh_lens.properties.groups` (grouped-query
attention), :mod:`~rh_lens.properties.stability` (over thresholds and numbers of trials), and
:mod:`~rh_lens.properties.summary` (all of them for several models, as
``python -m analyses.properties`` saves them).  Every public name is importable from here.
Nothing here needs torch.
"""

from rh_lens.heads import THRESHOLD
from rh_lens.properties.activation import ALWAYS_ON_LEVEL, ActivationResult, compute_activation
from rh_lens.properties.groups import GroupResult, compute_groups, group_scores
from rh_lens.properties.intrinsic import (
    TOPK,
    CorrelationMatrix,
    IntrinsicResult,
    compute_correlation_matrix,
    compute_intrinsic,
)
from rh_lens.properties.kinds import ScoreComparison, compute_score_comparison
from rh_lens.properties.scores import SCORES, HeadScores, Table, TrialContext, load_head_scores
from rh_lens.properties.sparsity import (
    BIN_LABELS,
    SparsityResult,
    compute_sparsity,
    retrieval_heads,
)
from rh_lens.properties.stability import (
    THRESHOLDS,
    StabilityCurve,
    ThresholdSweep,
    compute_stability,
    compute_threshold_sweep,
)
from rh_lens.properties.summary import (
    SUMMARY_JSON,
    TABLE_TXT,
    PropertySummary,
    compute_property_summary,
)
from rh_lens.properties.switch_on import FACTORS, SwitchOnResult, compute_switch_on
from rh_lens.properties.universality import ModelSummary, UniversalityResult, compute_universality

__all__ = [
    "ALWAYS_ON_LEVEL", "BIN_LABELS", "FACTORS", "SCORES", "SUMMARY_JSON", "TABLE_TXT",
    "THRESHOLD", "THRESHOLDS", "TOPK", "ActivationResult", "CorrelationMatrix", "GroupResult",
    "HeadScores", "IntrinsicResult", "ModelSummary", "PropertySummary", "ScoreComparison",
    "SparsityResult", "StabilityCurve", "SwitchOnResult", "Table", "ThresholdSweep",
    "TrialContext", "UniversalityResult", "compute_activation", "compute_correlation_matrix",
    "compute_groups", "compute_intrinsic", "compute_property_summary", "compute_score_comparison",
    "compute_sparsity", "compute_stability", "compute_switch_on", "compute_threshold_sweep",
    "compute_universality", "group_scores", "load_head_scores", "retrieval_heads",
]
