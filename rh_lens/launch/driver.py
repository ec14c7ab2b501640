"""The one driver loop of every launcher: submit the unfinished shards, watch the store, report.

Progress is read from the store (finished records over all workers), never from job states; job
states only say when to stop waiting and which jobs failed.  A failed job is reported with the
tail of its log and the commands that rerun it; the launch's provenance (launcher, job ids,
each cell's host) is returned for the result's metadata.
"""

import shlex
import sys
import time

from rh_lens.launch.backends import make_backend
from rh_lens.launch.plan import LaunchError, LaunchSettings, Plan
from rh_lens.launch.worker import cell_hosts, read_attempts


def _command(module: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])


def drive(plan: Plan, settings: LaunchSettings, *, module: str, argv: list[str],
          progress: bool = True, poll_s: float = 1.0) -> dict:
    """Run the unfinished shards of ``plan`` on ``settings.launcher`` and wait for them.

    Each job runs ``python -m <module> <argv> --shard I/N`` (``argv``: the command line without
    the launch options, which the job overrides).  Returns the provenance: launcher, shards,
    the ids of this launch's jobs and of every earlier attempt, each cell's host.  Failed jobs
    raise :class:`LaunchError` after they are reported on stderr; Ctrl-C cancels the jobs."""
    from tqdm.auto import tqdm

    backend = make_backend(plan.out, settings)  # refuses a missing cluster before submitting
    try:
        todo = plan.unfinished_shards()
        calls = [{"module": module, "argv": list(argv), "out": str(plan.out),
                  "shard": (i, plan.n_shards), "units": plan.shard(i),
                  "launcher": settings.launcher} for i in todo]
        jobs = backend.submit(calls) if calls else []
        if jobs:
            print(f"{settings.launcher}: submitted {len(jobs)} of {plan.n_shards} shards "
                  f"(jobs {', '.join(j.id for j in jobs)}); logs in {backend.folder}",
                  file=sys.stderr)
        states: dict[int, tuple[str, str]] = {}
        with tqdm(total=len(plan.units), desc=f"cells ({settings.launcher})",
                  disable=not progress) as bar:
            try:
                while True:
                    states = backend.poll(jobs)
                    bar.n = len(plan.finished())
                    bar.refresh()
                    if all(s != "running" for s, _ in states.values()):
                        break
                    time.sleep(poll_s)
            except KeyboardInterrupt:
                backend.cancel(jobs)
                print(f"interrupted: cancelled {len(jobs)} jobs; finished cells are saved, "
                      "rerun the same command to submit the rest", file=sys.stderr)
                raise
        failed = [j for j in jobs if states[j.shard][0] == "failed"]
        if failed:
            for job in failed:
                local = [*argv, "--shard", f"{job.shard}/{plan.n_shards}"]
                print(f"shard {job.shard}/{plan.n_shards} (job {job.id}) failed: "
                      f"{states[job.shard][1]}\n--- last lines of {job.log} ---\n"
                      f"{backend.log_tail(job)}\n--- run just this shard here: "
                      f"{_command(module, local)}", file=sys.stderr)
            raise LaunchError(
                f"{len(failed)} of {len(jobs)} jobs failed ({len(plan.finished())} of "
                f"{len(plan.units)} cells finished); rerun the same command to submit only the "
                "unfinished shards")
        missing = len(plan.units) - len(plan.finished())
        if missing:
            raise LaunchError(f"the jobs ended but {missing} cells are not in {plan.out}")
    finally:
        backend.close()
    hosts = cell_hosts(plan.out, list(plan.units))
    return {"launcher": settings.launcher, "shards": plan.n_shards,
            "job_ids": [j.id for j in jobs],
            "attempts": [{k: a.get(k) for k in ("shard", "host", "job_id", "started")}
                         for a in read_attempts(plan.out)],
            "resources": settings.resources(),
            "cell_hosts": hosts}
