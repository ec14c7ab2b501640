"""Activation patching: each head's output (``hook_z``) at the patch positions replaced with the
source run's, one head at a time."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from rh_lens.interventions import replace_output_hooks
from rh_lens.models import Model
from rh_lens.patching.pairs import PatchPair
from rh_lens.patching.runs import PatchConfig, _batches, _logit_diff, _Normalised, _run, _start


@dataclass(frozen=True)
class ActivationPatchingResult(_Normalised):
    """``logit_diff[pair, layer, head]``: the metric with that head's output patched."""

    logit_diff: Float[np.ndarray, "n_pairs n_layers n_heads"]
    clean_logit_diff: Float[np.ndarray, " n_pairs"]
    corrupted_logit_diff: Float[np.ndarray, " n_pairs"]
    config: PatchConfig

    @property
    def normalized(self) -> Float[np.ndarray, "n_layers n_heads"]:
        """0 = the corrupted run's logit difference, 1 = the clean run's."""
        return self._normalized(self.logit_diff)

    @property
    def effect(self) -> Float[np.ndarray, "n_layers n_heads"]:
        """Change from the unpatched run, in units of the clean - corrupted gap."""
        return self._effect(self.logit_diff)


def compute_activation_patching(model: Model, pairs: Sequence[PatchPair],
                                cfg: PatchConfig | None = None, *,
                                progress: bool = False) -> ActivationPatchingResult:
    """Patch each head's output, one head at a time, from the source run into the base run."""
    cfg = cfg or PatchConfig()
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    clean, corrupted = np.zeros(len(pairs)), np.zeros(len(pairs))
    out = np.full((len(pairs), n_layers, n_heads), np.nan)
    batches = _batches(model, pairs, cfg)
    bar = tqdm(total=len(batches) * n_layers * n_heads, disable=not progress,
               desc="activation patching")
    with torch.no_grad():
        for batch in batches:
            source_z = _start(model, batch, clean, corrupted, range(n_layers))
            for layer in range(n_layers):
                for head in range(n_heads):
                    fwd = replace_output_hooks([(layer, head)], source_z,
                                                     positions=batch.positions)
                    out[batch.index, layer, head] = _logit_diff(_run(model, batch.base, fwd), batch)
                    bar.update()
    bar.close()
    return ActivationPatchingResult(out, clean, corrupted, cfg)
