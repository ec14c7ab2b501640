"""The engines that run a launch's jobs: a Slurm job array through submitit, or Ray tasks.

Both answer the same questions for :func:`rh_lens.launch.drive`: submit these shards, which jobs
still run and how the others ended, the tail of a job's log, cancel.  Nothing here schedules:
Slurm and Ray do.  Errors that can be found before anything is submitted (no ``sbatch``, no Ray
cluster at the address) are raised when a backend is made.
"""

import contextlib
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rh_lens.launch.plan import LAUNCH_DIR, LaunchError, LaunchSettings
from rh_lens.launch.worker import run

DEFAULT_TIMEOUT_MIN = 24 * 60  # submitit's own default is 5 minutes


@dataclass
class Job:
    shard: int
    id: str
    handle: Any
    log: Path | None = None


def tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.is_file():
        return "(no log)"
    text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


class SubmititBackend:
    """One Slurm job array (``map_array``); logs in ``<out>/launch/slurm``."""

    name = "submitit"

    def __init__(self, out: Path, settings: LaunchSettings):
        if shutil.which("sbatch") is None:
            raise LaunchError("--launcher submitit needs a Slurm cluster, and sbatch is not on "
                              "PATH here; run the command on a login node")
        import submitit

        ex = dict(settings.executor)
        params = {"name": "rh_lens", "timeout_min": ex.pop("timeout_min", DEFAULT_TIMEOUT_MIN),
                  "cpus_per_task": ex.pop("cpus_per_task", 1)}
        if "mem_gb" in ex:
            params["mem_gb"] = ex.pop("mem_gb")
        slurm_names = {"gpus_per_task": "slurm_gpus_per_task", "partition": "slurm_partition",
                       "account": "slurm_account", "qos": "slurm_qos",
                       "constraint": "slurm_constraint",
                       "array_parallelism": "slurm_array_parallelism", "setup": "slurm_setup"}
        params.update({slurm_names[k]: v for k, v in ex.items()})
        self.folder = out / LAUNCH_DIR / "slurm"
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster="slurm")
        self.executor.update_parameters(**params)

    def submit(self, calls: list[dict]) -> list[Job]:
        handles = self.executor.map_array(run, calls)
        return [Job(c["shard"][0], str(h.job_id), h, Path(h.paths.stderr)) for c, h in
                zip(calls, handles, strict=True)]

    def _alive(self) -> set[str] | None:
        """The ids of this user's jobs Slurm still holds (pending, running, completing)."""
        try:
            listed = subprocess.run(["squeue", "--me", "-h", "-r", "-o", "%i"], check=True,
                                    capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None  # the controller did not answer: ask again later
        return set(listed.split())

    def poll(self, jobs: list[Job]) -> dict[int, tuple[str, str]]:
        alive = self._alive()
        states = {}
        for job in jobs:
            result = Path(job.handle.paths.result_pickle)
            if result.exists():
                try:
                    job.handle.result()
                    states[job.shard] = ("done", "")
                except Exception as err:  # the shard's command raised
                    states[job.shard] = ("failed", str(err).strip().splitlines()[-1:][0]
                                         if str(err).strip() else type(err).__name__)
            elif alive is None or job.id in alive:
                states[job.shard] = ("running", "")
            else:
                states[job.shard] = ("failed", "ended without a result (cancelled, killed, "
                                               "pre-empted or out of time)")
        return states

    def log_tail(self, job: Job) -> str:
        parts = [tail(Path(job.handle.paths.stderr)), tail(Path(job.handle.paths.stdout), 5)]
        return "\n".join(p for p in parts if p not in ("(no log)", "(empty log)")) or "(no log)"

    def cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            with contextlib.suppress(Exception):
                job.handle.cancel(check=False)

    def close(self) -> None:
        pass


def _check_reachable(address: str) -> None:
    """A clear error, at once, when nothing listens at a ``HOST:PORT`` Ray address."""
    if address == "auto" or address.startswith(("ray://", "local")):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"--ray-address {address!r}: give auto or HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise LaunchError(f"--ray-address {address}: no Ray cluster answers there "
                          f"({err.strerror or err})") from None


class RayBackend:
    """One Ray task per shard; logs in ``<out>/launch/ray``.  Connects to the cluster at
    ``--ray-address`` (``auto``: the one started on this machine with ``ray start``), or starts
    a local one; a process already connected keeps its connection."""

    name = "ray"

    def __init__(self, out: Path, settings: LaunchSettings):
        import ray

        self.folder = out / LAUNCH_DIR / "ray"
        self.owned = False
        if not ray.is_initialized():
            address = settings.ray_address
            if address is not None:
                _check_reachable(address)
            # a local cluster's workers import this rh_lens; a remote one's must have it installed
            env = ({} if address is not None else
                   {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [
                       str(Path(__file__).resolve().parents[2]),
                       os.environ.get("PYTHONPATH")]))}})
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         runtime_env=env or None, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise LaunchError(f"--launcher ray: cannot connect to a Ray cluster at "
                                  f"{address or 'a new local cluster'} ({err})") from None
            self.owned = True
        res = settings.resources()
        self.remote = ray.remote(run).options(
            num_cpus=res.get("cpus_per_task", 1), num_gpus=res.get("gpus_per_task", 0),
            max_retries=0)
        self.ray = ray

    def submit(self, calls: list[dict]) -> list[Job]:
        jobs = []
        for call in calls:
            index, count = call["shard"]
            log = self.folder / f"shard{index}of{count}.log"
            ref = self.remote.remote({**call, "log": str(log)})
            jobs.append(Job(index, ref.task_id().hex(), ref, log))
        return jobs

    def poll(self, jobs: list[Job]) -> dict[int, tuple[str, str]]:
        refs = [j.handle for j in jobs]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = set(ready)
        states = {}
        for job in jobs:
            if job.handle not in ready:
                states[job.shard] = ("running", "")
                continue
            try:
                self.ray.get(job.handle)
                states[job.shard] = ("done", "")
            except Exception as err:
                lines = str(err).strip().splitlines()
                states[job.shard] = ("failed", f"{type(err).__name__}: "
                                     + (lines[-1] if lines else ""))
        return states

    def log_tail(self, job: Job) -> str:
        return tail(job.log)

    def cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            with contextlib.suppress(Exception):
                self.ray.cancel(job.handle, force=True)

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def make_backend(out: Path, settings: LaunchSettings):
    return {"submitit": SubmititBackend, "ray": RayBackend}[settings.launcher](out, settings)


def check_engine(settings: LaunchSettings) -> None:
    """Refuse, before anything is loaded or submitted, a launcher whose engine is not there."""
    if settings.launcher == "submitit" and shutil.which("sbatch") is None:
        raise LaunchError("--launcher submitit needs a Slurm cluster, and sbatch is not on "
                          "PATH here; run the command on a login node")
    if settings.launcher == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise LaunchError("--launcher ray needs the ray package (pip install ray)") from None
        if settings.ray_address is not None:
            _check_reachable(settings.ray_address)
    if settings.launcher == "submitit":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise LaunchError("--launcher submitit needs the submitit package (pip install "
                              "submitit)") from None
