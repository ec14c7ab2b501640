"""Activation patching and path patching of attention heads on clean/corrupted prompt pairs.

**Pairs.**  A :class:`PatchPair` is a clean prompt (a needle with answer A) and a corrupted prompt
(the same needle with answer B) of equal token length, both ending where the first token in which
A and B differ is predicted (a shared answer prefix, such as `` the``, is appended to both).  The
metric is the logit difference ``logit[A] - logit[B]`` at that last position.  :func:`make_pair`
builds a pair from a needle and an alternative answer (the zoo's pairs:
:func:`rh_lens.zoo.inputs.zoo_pairs`).

**Direction.**  ``"denoise"`` (default) runs the corrupted prompt and patches in the clean run's
activations: an effect is the clean behaviour a component restores.  ``"noise"`` runs the clean
prompt and patches in the corrupted run's activations (Wang et al. 2022): an effect is the damage.
``normalized`` is 0 at the corrupted run's logit difference and 1 at the clean run's, in both
directions; ``effect`` is the change from the unpatched run on that scale (0: no effect; +1: full
recovery when denoising; -1: full damage when noising).  Logit differences are averaged over
pairs before normalising.

**Activation patching** replaces a head's output (``hook_z``) at the patch positions with the
source run's.

**Path patching** (Wang et al. 2022; Goldowsky-Dill et al. 2023).  One forward pass on the base
prompt in which every component reads the residual stream as usual, where the senders write their
output of *this* pass, except the receivers, which read it with the senders' terms replaced by
their source-run values: a receiver's input gets ``+ sum_s W_O^s (z_s^source - z_s^pass)`` at the
patch positions.  Components after a receiver are recomputed, so the receiver's changed output
propagates along every path.  The effect through receiver R is thus that of all paths whose first
edge is sender -> R.  Every other component, MLPs included, is *frozen* with respect to the
senders: it sees their base output, so a path sender -> MLP -> R counts only when that MLP is a
receiver too.  For receivers none of which reads another's output (one receiver; receivers in one
layer) this is exactly Wang et al.'s three-step procedure with all heads and MLPs frozen.  With
every reader as receiver (:func:`all_receivers`) it equals activation patching of the senders.

Receivers (:class:`Receiver`): a head's query, key or value input (the residual stream before
``ln1``; in grouped-query models per *query* head: the model runs with ungrouped keys/values while
patching, so the head's siblings keep theirs), a layer's MLP input, or ``direct``: the input of
``ln_final`` and the unembedding.  Patching runs inside :func:`receiver_mode`, which switches on
TransformerLens's split q/k/v inputs and restores the model's settings afterwards.

Modules: :mod:`~rh_lens.patching.pairs`, :mod:`~rh_lens.patching.runs` (configuration, batches,
metric), :mod:`~rh_lens.patching.activation`, :mod:`~rh_lens.patching.paths`, both saved as one
:class:`~rh_lens.patching.result.PatchingResult`; figures in
:mod:`rh_lens.plotting.patching`.
"""

from rh_lens.patching.activation import ActivationPatchingResult, compute_activation_patching
from rh_lens.patching.draws import SetPatchingResult, compute_set_patching
from rh_lens.patching.pairs import PairError, PatchPair, make_pair
from rh_lens.patching.paths import (
    HEAD_COMPONENTS,
    Component,
    PathPatchingResult,
    Receiver,
    all_receivers,
    compute_path_patching,
    head_receivers,
    path_patch,
    path_patching_hooks,
    receiver_mode,
)
from rh_lens.patching.result import PatchingResult
from rh_lens.patching.runs import Direction, PatchConfig, PositionSpec

__all__ = [
    "HEAD_COMPONENTS", "ActivationPatchingResult", "Component", "Direction", "PairError",
    "PatchConfig", "PatchPair", "PatchingResult", "PathPatchingResult", "PositionSpec",
    "Receiver", "SetPatchingResult", "all_receivers", "compute_activation_patching",
    "compute_path_patching", "compute_set_patching", "head_receivers", "make_pair",
    "path_patch", "path_patching_hooks", "receiver_mode",
]
