"""Per-head induction scores on repeated random tokens (TransformerLens's standard measure).

A batch of random token sequences, each followed by itself (after the model's BOS, when it
prepends one): an induction head attending from a token in the second copy goes to the token
that followed the same token in the first copy, ``seq_len - 1`` positions back.  A head's score
is its attention on that diagonal ("the induction stripe"), averaged over the second copy's
positions and the batch, as in TransformerLens's main demo; it is 1 for a perfect induction
head.  Only the stripe is kept from each pattern hook.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rh_lens import hooks
from rh_lens.engine import model_facts, tokenize


@dataclass(frozen=True)
class InductionConfig:
    """The repeated random tokens: ``batch`` sequences of ``seq_len`` tokens, each twice."""

    seq_len: int = 50
    batch: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 2 or self.batch < 1:
            raise ValueError(f"induction needs seq_len >= 2 and batch >= 1, got {self}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def repeated_tokens(model, cfg: InductionConfig) -> Int[Tensor, "batch pos"]:
    """``[BOS] + r + r`` per row (BOS as the model prepends it), ``r`` uniform over the
    vocabulary without its special tokens, drawn from a generator seeded with ``cfg.seed``."""
    facts = model_facts(model)
    prefix = tokenize(model, "")
    if len(prefix) + 2 * cfg.seq_len > facts.n_ctx:
        raise ValueError(f"induction sequences of 2 x {cfg.seq_len} tokens exceed the model's "
                         f"context of {facts.n_ctx}")
    special = set(getattr(model.tokenizer, "all_special_ids", None) or [])
    pool = torch.tensor([t for t in range(facts.d_vocab) if t not in special])
    gen = torch.Generator().manual_seed(cfg.seed)
    rand = pool[torch.randint(len(pool), (cfg.batch, cfg.seq_len), generator=gen)]
    return torch.cat([prefix.expand(cfg.batch, -1), rand, rand], dim=1)


def induction_scores(model, cfg: InductionConfig = InductionConfig()
                     ) -> Float[np.ndarray, "n_layers n_heads"]:
    """Each head's mean attention on the induction stripe of :func:`repeated_tokens`."""
    facts = model_facts(model)
    tokens = repeated_tokens(model, cfg)
    first = tokens.shape[1] - cfg.seq_len  # the second copy's first position
    out = np.zeros((facts.n_layers, facts.n_heads))

    def keep_stripe(layer: int):
        def hook(pattern, hook):
            stripe = pattern.diagonal(offset=1 - cfg.seq_len, dim1=-2, dim2=-1)
            # element i is query (seq_len - 1 + i): keep the second copy's queries
            kept = stripe[..., first - cfg.seq_len + 1:].double()
            out[layer] = kept.mean(dim=(0, 2)).cpu().numpy()
        return hook

    fwd = [(hooks.pattern(layer), keep_stripe(layer)) for layer in range(facts.n_layers)]
    with torch.no_grad(), model.hooks(fwd_hooks=fwd):
        model(tokens.to(model.cfg.device))
    return out
