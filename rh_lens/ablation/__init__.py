"""Head-level ablation: Needle-in-a-Haystack with chosen heads masked (Wu et al., sec. 3, Fig. 7).

- What a masked head outputs (``mode``: ``uniform``, the paper's zero query; ``zero``; ``mean``;
  ``resample``) and at which positions (``decode``, the paper; ``all``):
  :mod:`rh_lens.interventions` (:func:`ablation_hooks`).
- Which heads (:class:`Condition`, :func:`conditions_from_masks`): none; top-K by a detection
  result's mean scores (ties layer-major); random-K drawn with
  ``numpy.random.default_rng(seed)`` from the heads that are neither retrieval heads (score >
  ``threshold``) nor excluded, ``n_draws`` draws, draw ``d`` being the first K of the ``d``-th
  permutation so that draws are nested in K and one draw serves every cell of a sweep; explicit
  lists and whole key/value groups (:mod:`rh_lens.heads`).  The reference implementation's
  defects are not repeated: its random set did not exclude retrieval heads, assumed 32 x 32
  heads, and was unseeded and redrawn for every cell.
- The sweep (:func:`compute_ablation`, :class:`AblationConfig`): :mod:`rh_lens.ablation.sweep`;
  one record per (condition, cell): :mod:`rh_lens.ablation.records`.
- What the model answered and where the watched heads looked (``ERROR_TYPES``, ``PLACES``):
  :mod:`rh_lens.ablation.taxonomy`.  Under ``uniform`` a masked head's attention is set by the
  mask, so masked heads are left out of the attention shares; the other modes leave attention
  untouched.
- Aggregates (:class:`AblationResult`, :class:`KCurve`): :mod:`rh_lens.ablation.result`;
  figures: :mod:`rh_lens.plotting.ablation`.
"""

from rh_lens.ablation.conditions import Condition, Kind, conditions_from_masks, model_shape
from rh_lens.ablation.config import AblationConfig
from rh_lens.ablation.records import AblationRecord
from rh_lens.ablation.result import AblationResult, KCurve
from rh_lens.ablation.sweep import compute_ablation, reference_prompts, sweep_units
from rh_lens.ablation.taxonomy import (
    ERROR_TYPES,
    PLACES,
    Regions,
    attention_places,
    classify_output,
    prompt_regions,
)
from rh_lens.interventions import (
    MODES,
    WHERE,
    Donor,
    Mode,
    Where,
    ablation_hooks,
    capture_donor,
    compute_mean_z,
)

__all__ = [
    "ERROR_TYPES", "MODES", "PLACES", "WHERE", "AblationConfig",
    "AblationRecord", "AblationResult", "Condition", "Donor", "KCurve", "Kind", "Mode", "Regions",
    "Where", "ablation_hooks", "attention_places", "capture_donor", "classify_output",
    "compute_ablation", "compute_mean_z", "conditions_from_masks", "model_shape",
    "prompt_regions", "reference_prompts", "sweep_units",
]
