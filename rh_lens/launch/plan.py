"""What a launch is: the launcher and its resources (:class:`LaunchSettings`, from flags and an
executor file) and the sweep's units split into shards (:class:`Plan`)."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rh_lens.errors import RhLensError
from rh_lens.store import finished_units, shard

Launcher = Literal["local", "submitit", "ray"]
LAUNCHERS: tuple[str, ...] = ("local", "submitit", "ray")
LAUNCH_DIR = "launch"  # under the output directory: job logs and attempt records

# Executor-file keys: name -> (type, launchers that read it, meaning).
EXECUTOR_KEYS = {
    "cpus_per_task": (int, ("submitit", "ray"), "CPUs per job"),
    "gpus_per_task": ((int, float), ("submitit", "ray"), "GPUs per job (Ray: may be fractional)"),
    "partition": (str, ("submitit",), "Slurm partition"),
    "account": (str, ("submitit",), "Slurm account"),
    "qos": (str, ("submitit",), "Slurm quality of service"),
    "constraint": (str, ("submitit",), "Slurm node features"),
    "mem_gb": ((int, float), ("submitit",), "memory per job in GB"),
    "timeout_min": (int, ("submitit",), "time limit per job in minutes"),
    "array_parallelism": (int, ("submitit",), "array tasks running at once"),
    "setup": (list, ("submitit",), "shell lines run before each job (module load, venv)"),
}


class LaunchError(RhLensError):
    """A launch that cannot start (bad settings, no cluster) or whose jobs failed."""


def read_executor_config(path: str | Path, launcher: str) -> dict:
    """The settings of the TOML executor file ``path`` for ``launcher``; a key it does not know,
    or one that ``launcher`` does not read, is refused, naming it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise LaunchError("an executor file needs Python 3.11 or later (tomllib)") from None
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise LaunchError(f"executor file {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise LaunchError(f"executor file {path}: not valid TOML ({err})") from None
    unknown = sorted(set(data) - set(EXECUTOR_KEYS))
    if unknown:
        raise LaunchError(f"executor file {path}: unknown key(s) {', '.join(unknown)} (known: "
                          f"{', '.join(EXECUTOR_KEYS)})")
    for key, value in data.items():
        kind, launchers, _ = EXECUTOR_KEYS[key]
        if launcher not in launchers:
            raise LaunchError(f"executor file {path}: {key} is not read by the {launcher} "
                              "launcher")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise LaunchError(f"executor file {path}: {key} = {value!r} has the wrong type")
        if key == "setup" and not all(isinstance(line, str) for line in value):
            raise LaunchError(f"executor file {path}: setup must be a list of strings")
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            raise LaunchError(f"executor file {path}: {key} must be positive, got {value}")
    return data


@dataclass(frozen=True)
class LaunchSettings:
    """The launcher, the number of jobs, and the resources of each job."""

    launcher: str = "local"
    jobs: int = 1
    executor: dict = field(default_factory=dict)  # read_executor_config's settings
    ray_address: str | None = None
    dry_run: bool = False

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise LaunchError(f"unknown launcher {self.launcher!r}; choose one of "
                              f"{', '.join(LAUNCHERS)}")
        if self.jobs < 1:
            raise LaunchError(f"--jobs must be at least 1, got {self.jobs}")
        if self.launcher == "local" and self.jobs != 1:
            raise LaunchError("--jobs needs --launcher submitit or ray (a local run is one "
                              "process; use --shard I/N to run part of a sweep)")
        if self.ray_address is not None and self.launcher != "ray":
            raise LaunchError("--ray-address needs --launcher ray")

    def resources(self) -> dict:
        """Each job's resources as the launcher will request them."""
        out = {"cpus_per_task": self.executor.get("cpus_per_task", 1)}
        if "gpus_per_task" in self.executor:
            out["gpus_per_task"] = self.executor["gpus_per_task"]
        return {**self.executor, **out}


@dataclass(frozen=True)
class Plan:
    """The units of a sweep stored in ``out`` (record paths relative to it, in sweep order),
    split into ``n_shards`` shards by :func:`rh_lens.store.shard`."""

    out: Path
    units: tuple[str, ...]
    n_shards: int

    @classmethod
    def make(cls, out: str | Path, units: Sequence[str], jobs: int) -> "Plan":
        if not units:
            raise LaunchError("the sweep has no cells")
        if len(set(units)) != len(units):
            raise LaunchError("the sweep's cells repeat")
        return cls(Path(out), tuple(units), max(1, min(jobs, len(units))))

    def shard(self, index: int) -> list[str]:
        return shard(self.units, index, self.n_shards)

    def finished(self) -> set[str]:
        """The units whose records are in the store now."""
        return finished_units(self.out) & set(self.units)

    def unfinished_shards(self) -> list[int]:
        done = self.finished()
        return [i for i in range(self.n_shards) if not set(self.shard(i)) <= done]

    def describe(self, settings: LaunchSettings) -> str:
        """The plan as printed by ``--dry-run``."""
        done = self.finished()
        todo = self.unfinished_shards()
        lines = [f"{len(self.units)} cells in {self.out}, {len(done)} finished; "
                 f"{self.n_shards} shards, {len(todo)} to submit as {settings.launcher} jobs"]
        for i in range(self.n_shards):
            mine = self.shard(i)
            left = sum(1 for u in mine if u not in done)
            lines.append(f"  shard {i}/{self.n_shards}: {len(mine)} cells, {left} unfinished"
                         + ("" if left else " (skipped)"))
        res = settings.resources()
        lines.append("  per job: " + ", ".join(f"{k}={v}" for k, v in res.items()))
        if settings.ray_address:
            lines.append(f"  ray address: {settings.ray_address}")
        return "\n".join(lines)
