"""The dimension vocabulary of rh_lens, shared with TransformerLens.

Tensor shapes are written with TransformerLens's names (see the docstring of
``transformer_lens.ActivationCache``): ``batch pos head_index d_head d_model d_vocab
query_pos key_pos``.  Per-head tables are ``"n_layers n_heads"`` arrays; labels such as
``L3H5`` are for display only.  One-dimensional shapes are written with a leading space
(``" key_pos"``) so that linters do not read them as names.
"""

from jaxtyping import Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
Logits = Float[Tensor, "batch pos d_vocab"]
HeadTable = Float[Tensor, "n_layers n_heads"]

__all__ = ["Float", "HeadTable", "Int", "Logits", "Tensor", "Tokens"]
