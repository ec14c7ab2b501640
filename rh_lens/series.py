"""Checkpoint series: an ordered set of checkpoints of one model, each loadable by
:func:`rh_lens.models.load_model`.

A series comes from

- a zoo training run saved every N steps (``python -m rh_lens.zoo.training.train NAME
  --save-every N``): ``zoo:NAME`` reads ``runs/zoo/NAME/steps/step-*`` (another run directory
  with ``run_dir``);
- local model directories, given one by one or as a folder of them (``runs/.../steps``);
- a Hugging Face name with revisions (Pythia's ``step1000``, ...), each loaded through
  ``load_model(name, revision=...)``.

A checkpoint's step is the training step it was written at: a zoo model's card says it, else the
last number in its directory or revision name (``step1000``, ``checkpoint-500``); where some
name has none, the checkpoints are numbered 0, 1, ... in the order given.
"""

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ZOO_RUNS = Path("runs") / "zoo"  # where a zoo training run writes, by name (train --run-dir)
STEPS = "steps"  # the models that train --save-every writes, one directory a step


def step_dir(run_dir: str | Path, step: int) -> Path:
    """Where a training run in ``run_dir`` writes the model of ``step`` (``--save-every``)."""
    return Path(run_dir) / STEPS / f"step-{step:06d}"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: the ``load_model`` spec (and revision) of the model at ``step``."""

    step: int
    spec: str
    revision: str | None = None

    @property
    def label(self) -> str:
        """The checkpoint's name in a store: ``step-SSSSSS``."""
        return f"step-{self.step:06d}"

    def load(self, **load_kwargs):
        """The model (``load_kwargs``: device, dtype, backend, ... of ``load_model``)."""
        from rh_lens.models import load_model

        return load_model(self.spec, revision=self.revision, **load_kwargs)

    def to_dict(self) -> dict:
        return {"step": self.step, "spec": self.spec, "revision": self.revision}


@dataclass(frozen=True)
class CheckpointSeries:
    """Checkpoints in increasing step order; ``source`` says where they came from."""

    source: str
    checkpoints: tuple[Checkpoint, ...]

    def __post_init__(self):
        if not self.checkpoints:
            raise ValueError(f"the checkpoint series {self.source} is empty")
        steps = [c.step for c in self.checkpoints]
        if steps != sorted(set(steps)):
            raise ValueError(f"the checkpoint series {self.source} needs distinct steps in "
                             f"increasing order, got {steps}")

    def __len__(self) -> int:
        return len(self.checkpoints)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def every(self, n: int) -> "CheckpointSeries":
        """The checkpoints at multiples of ``n`` steps, and the last one."""
        if n < 1:
            raise ValueError(f"--every takes a positive number of steps, not {n}")
        kept = tuple(c for c in self.checkpoints[:-1] if c.step % n == 0)
        return CheckpointSeries(self.source, (*kept, self.checkpoints[-1]))

    def to_dict(self) -> dict:
        return {"source": self.source, "checkpoints": [c.to_dict() for c in self.checkpoints]}


def _trailing_number(name: str) -> int | None:
    found = re.findall(r"\d+", name)
    return int(found[-1]) if found else None


def _numbered(source: str, items: Sequence[tuple[int | None, str, str | None]]
              ) -> CheckpointSeries:
    """A series of ``(step or None, spec, revision)``; all numbered by position when a step is
    missing, else sorted by step."""
    if any(step is None for step, _, _ in items):
        items = [(i, spec, rev) for i, (_, spec, rev) in enumerate(items)]
    else:
        items = sorted(items, key=lambda item: item[0])
    return CheckpointSeries(source, tuple(Checkpoint(s, spec, rev) for s, spec, rev in items))


def _card_step(path: Path) -> int | None:
    card = path / "card.json"
    if not card.is_file():
        return None
    try:
        step = json.loads(card.read_text(encoding="utf-8")).get("steps")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def directory_series(dirs: Sequence[str | Path]) -> CheckpointSeries:
    """Model directories, or one folder whose subfolders (with a ``config.json``) are the
    checkpoints."""
    paths = [Path(d).expanduser() for d in dirs]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise ValueError(f"checkpoint directories not found: {', '.join(missing)}")
    source = ", ".join(map(str, paths))
    if len(paths) == 1 and not (paths[0] / "config.json").is_file():
        paths = sorted(p for p in paths[0].iterdir() if (p / "config.json").is_file())
        if not paths:
            raise ValueError(f"the checkpoint series {source} is empty: no model directory "
                             "(with a config.json) in it")
    items = [(_card_step(p) if _card_step(p) is not None else _trailing_number(p.name), str(p),
              None) for p in paths]
    return _numbered(source, items)


def zoo_series(name: str, *, run_dir: str | Path | None = None) -> CheckpointSeries:
    """The models a zoo training run saved (``train NAME --save-every N``), by step."""
    run_dir = Path(run_dir) if run_dir is not None else ZOO_RUNS / name
    steps = run_dir / STEPS
    saved = sorted(steps.glob("step-*[0-9]")) if steps.is_dir() else []
    if not saved:
        raise ValueError(f"the checkpoint series zoo:{name} is empty: no saved steps in {steps}; "
                         f"train them first with python -m rh_lens.zoo.training.train {name} "
                         "--save-every N")
    series = directory_series(saved)
    return CheckpointSeries(f"zoo:{name} ({steps})", series.checkpoints)


def revision_series(name: str, revisions: Sequence[str]) -> CheckpointSeries:
    """The revisions of a Hugging Face model name (``EleutherAI/pythia-70m``, ``step1000``
    ...)."""
    if not revisions:
        raise ValueError(f"the checkpoint series {name} is empty: give its revisions")
    return _numbered(f"{name} at revisions {', '.join(revisions)}",
                     [(_trailing_number(r), name, r) for r in revisions])


def parse_series(specs: Sequence[str], *, revisions: Sequence[str] | None = None,
                 run_dir: str | Path | None = None) -> CheckpointSeries:
    """The series that ``specs`` name: ``zoo:NAME``, model directories (or a folder of them),
    or one Hugging Face name with ``revisions``."""
    specs = list(specs)
    if not specs:
        raise ValueError("the checkpoint series is empty: name a zoo run, directories or a "
                         "Hugging Face name with revisions")
    if revisions:
        if len(specs) != 1:
            raise ValueError(f"revisions belong to one Hugging Face name, got {specs}")
        return revision_series(specs[0], revisions)
    if specs[0].startswith("zoo:"):
        if len(specs) != 1:
            raise ValueError(f"a zoo series is one run, got {specs}")
        return zoo_series(specs[0].removeprefix("zoo:"), run_dir=run_dir)
    if len(specs) == 1 and not Path(specs[0]).expanduser().exists() and \
            not specs[0].startswith((".", "/", "~")):
        raise ValueError(f"{specs[0]}: a Hugging Face name needs its revisions (--revisions "
                         "step1000 step2000 ...)")
    return directory_series(specs)
