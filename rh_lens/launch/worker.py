"""What a job runs: the sweep's own command on one shard, and a record of the attempt.

Each attempt writes ``launch/attempts/<shard>-<host>-<pid>.json`` (host, process, job id, start
time, the shard's units) before it starts, so the driver can name the host of every cell (the
attempt that started last before the cell's record was written) and the process to look at.
"""

import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from rh_lens.launch.plan import LAUNCH_DIR
from rh_lens.results import write_json_atomic

ATTEMPTS = "attempts"


def job_id() -> str | None:
    """This process's job id: the Slurm array task, the Ray task, or none."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    if "SLURM_JOB_ID" in env:
        return env["SLURM_JOB_ID"]
    if "ray" in sys.modules:
        with contextlib.suppress(Exception):
            return sys.modules["ray"].get_runtime_context().get_task_id()
    return None


def run_shard(module: str, argv: list[str], out: str, shard: tuple[int, int],
              units: list[str], *, launcher: str, log: str | None = None) -> dict:
    """Run ``python -m <module> <argv> --shard I/N`` in this process (it writes its cells into
    ``out``); ``log``: append stdout and stderr there.  Raises when the command fails."""
    host = socket.gethostname()
    index, count = shard
    attempt = {"launcher": launcher, "shard": [index, count], "host": host, "pid": os.getpid(),
               "job_id": job_id(), "started": time.time(), "units": list(units)}
    folder = Path(out) / LAUNCH_DIR / ATTEMPTS
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{index}of{count}-{host}-{os.getpid()}-{time.time_ns()}.json",
                      attempt)
    args = [*argv, "--launcher", "local", "--shard", f"{index}/{count}", "--quiet"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_stop_on_sigterm(f"shard {index}/{count}"))
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            f = stack.enter_context(open(log, "a", encoding="utf-8", buffering=1))
            stack.enter_context(contextlib.redirect_stdout(f))
            stack.enter_context(contextlib.redirect_stderr(f))
        print(f"shard {index}/{count} on {host} (pid {os.getpid()}): python -m {module} "
              + " ".join(args), flush=True)
        try:
            rc = importlib.import_module(module).main(args)
        except BaseException:
            traceback.print_exc()
            raise
        if rc != 0:
            raise RuntimeError(f"shard {index}/{count}: python -m {module} exited with status "
                               f"{rc}")
    return {"host": host, "shard": [index, count]}


@contextlib.contextmanager
def _stop_on_sigterm(what: str):
    """Stop at once on SIGTERM (``scancel``, pre-emption, a Ray cancel): submitit ignores it,
    waiting for a SIGKILL that may come late or, without cgroups, never reach the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(f"{what}: stopped by SIGTERM (cancelled or pre-empted); its finished "
                         "cells are saved")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_attempts(out: str | Path) -> list[dict]:
    """Every attempt recorded under ``out``, oldest first."""
    folder = Path(out) / LAUNCH_DIR / ATTEMPTS
    found = []
    for path in folder.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            found.append(json.loads(path.read_text(encoding="utf-8")))
    return sorted(found, key=lambda a: a.get("started", 0))


def cell_hosts(out: str | Path, units: list[str]) -> dict[str, str | None]:
    """Each finished unit's host: that of the latest attempt listing it that started before its
    record was written (``None`` for a record written outside any launch)."""
    attempts = read_attempts(out)
    hosts: dict[str, str | None] = {}
    root = Path(out)
    for u in units:
        path = root / f"{u}.json"
        if not path.is_file():
            continue
        written = path.stat().st_mtime
        host = None
        for a in attempts:
            if a["started"] <= written and u in a.get("units", ()):
                host = a["host"]
        hosts[u] = host
    return hosts


def run(call: dict) -> dict:
    """:func:`run_shard` with its arguments in one mapping (for submitit's job arrays)."""
    return run_shard(**call)
