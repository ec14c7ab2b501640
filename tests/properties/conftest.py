"""Hand-made detection results the properties tests read."""

import itertools
import json

import numpy as np

from rh_lens.results import RunMetadata, save_result


def detect_dir(path, trial_step, success, cells, *, n_kv_heads=None, model="hand-made",
               arrays=None):
    """A detection directory as analyses.detect writes it (only what properties reads), with
    more ``arrays`` (``trial_mass``, ...) if given."""
    trial_step = np.asarray(trial_step, dtype=np.float64)
    n_layers, n_heads = trial_step.shape[1:]
    save_result(
        path, kind="detect", meta=RunMetadata(model_spec=model), summary={},
        config={"model": model, "shape": {"n_layers": n_layers, "n_heads": n_heads,
                                          "n_kv_heads": n_kv_heads or n_heads}},
        arrays={"trial_step": trial_step, "trial_set": np.minimum(trial_step, 1.0),
                "trial_active": (trial_step > 0).astype(np.float64),
                "success": np.asarray(success, dtype=bool), **(arrays or {})},
    )
    with open(path / "trials.jsonl", "w") as f:
        for (needle, length, depth), ok in zip(cells, success, strict=True):
            f.write(json.dumps({"cell": {"needle": needle, "length": length, "depth": depth},
                                "success": bool(ok), "generated": "x"}) + "\n")
    return path


def switch_setup():
    """12 trials: needles {0, 1} x lengths {100, 200} x depths {0, 50, 100}; all succeed.

    Head (0, 1) copies exactly when the needle is 1; head (0, 2) when depth is 0; head (0, 0)
    always; head (1, *) never.
    """
    cells = list(itertools.product((0, 1), (100, 200), (0.0, 50.0, 100.0)))
    trials = np.zeros((len(cells), 2, 3))
    for t, (needle, _, depth) in enumerate(cells):
        trials[t, 0, 0] = 0.5
        trials[t, 0, 1] = 1.0 if needle == 1 else 0.0
        trials[t, 0, 2] = 1.0 if depth == 0.0 else 0.0
    return cells, trials
