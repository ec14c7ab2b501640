"""The embedded model zoo: small HookedTransformers with genuine retrieval heads, trained by the
project on its own generated data, shipped in ``rh_lens/zoo/models/`` and loaded with
``rh_lens.load_model("zoo:NAME")``.

Runtime modules: :mod:`~rh_lens.zoo.prose` (seeded prose), :mod:`~rh_lens.zoo.tasks` (NIAH,
multi-hop CoT, parametric facts, chat format) and :mod:`~rh_lens.zoo.inputs` (the analyses'
default inputs for zoo models: detection needles and haystacks, patching pairs, CoT tasks).
Training lives apart in :mod:`rh_lens.zoo.training`, which depends on the library and the
runtime modules, never the reverse.  Only the checkpoint layout is imported here (from
:mod:`rh_lens.series`, which reads it), so ``import rh_lens.zoo`` stays cheap.
"""

from pathlib import Path

from rh_lens.series import STEPS, ZOO_RUNS, step_dir

PACKAGE_MODELS = Path(__file__).resolve().parent / "models"
RUNS = ZOO_RUNS  # a training run's directory: RUNS / NAME (train --run-dir moves it)

__all__ = ["PACKAGE_MODELS", "RUNS", "STEPS", "step_dir"]
