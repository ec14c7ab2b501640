"""The embedded model zoo: small HookedTransformers with genuine retrieval heads, trained by the
project on its own generated data, shipped in ``rh_lens/zoo/models/`` and loaded with
``rh_lens.load_model("zoo:NAME")``.

Runtime modules: :mod:`~rh_lens.zoo.prose` (seeded prose), :mod:`~rh_lens.zoo.tasks` (NIAH,
multi-hop CoT, parametric facts, chat format) and :mod:`~rh_lens.zoo.inputs` (the analyses'
default inputs for zoo models: detection needles and haystacks, patching pairs, CoT tasks).
Training lives apart in :mod:`rh_lens.zoo.training`, which depends on the library and the
runtime modules, never the reverse.  Nothing is imported here, so ``import rh_lens.zoo`` stays
cheap.
"""

from pathlib import Path

PACKAGE_MODELS = Path(__file__).resolve().parent / "models"
RUNS = Path("runs") / "zoo"  # a training run's directory: RUNS / NAME (train --run-dir moves it)
STEPS = "steps"  # the models that train --save-every writes, one directory a step


def step_dir(run_dir: str | Path, step: int) -> Path:
    """Where a training run in ``run_dir`` writes the model of ``step`` (``--save-every``)."""
    return Path(run_dir) / STEPS / f"step-{step:06d}"
