"""The dimension vocabulary of rh_lens, shared with TransformerLens.

Tensor shapes are written with TransformerLens's names (see the docstring of
``transformer_lens.ActivationCache``): ``batch pos head_index d_head d_model d_vocab
query_pos key_pos``.  Per-head tables are ``"n_layers n_heads"`` numpy arrays, per key/value
group ``"n_layers n_kv_heads"``; labels such as ``L3H5`` are for display only
(:func:`rh_lens.heads.label`).  One-dimensional shapes are written with a leading space
(``" key_pos"``) so that linters do not read them as names.

This module needs numpy only, so that the torch-free modules (:mod:`rh_lens.heads`,
:mod:`rh_lens.properties`) can use it.
"""

import numpy as np
from jaxtyping import Bool, Float, Int

HeadTable = Float[np.ndarray, "n_layers n_heads"]
HeadMask = Bool[np.ndarray, "n_layers n_heads"]
HeadCounts = Int[np.ndarray, "n_layers n_heads"]
GroupTable = Float[np.ndarray, "n_layers n_kv_heads"]
TrialTable = Float[np.ndarray, "n_trials n_layers n_heads"]

__all__ = ["GroupTable", "HeadCounts", "HeadMask", "HeadTable", "TrialTable"]
