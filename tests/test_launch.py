"""Launchers against real engines: a one-node Slurm cluster through submitit, a local Ray cluster.

Every launched sweep must write exactly the outputs of a local run of the same cells, and a job
killed mid-shard must cost only its unfinished cells: rerunning the command resubmits that shard
alone.  Bad launch settings are refused before anything is loaded or submitted.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from analyses import _cli, ablate, cot, detect
from rh_lens.launch import LaunchError, LaunchSettings, Plan, read_executor_config
from rh_lens.results import load_result
from rh_lens.store import finished_units, unit

ROOT = Path(__file__).resolve().parents[1]
# 18 cells, 9 per shard with --jobs 2: a job writes its cells 4 at a time, so one can be killed
# after its first cells and before its last.
SWEEP = ["--lengths", "96", "128", "160", "--depths", "0", "20", "40", "60", "80", "100",
         "--n-needles", "1", "--max-new-tokens", "8", "--quiet"]
needs_slurm = pytest.mark.skipif(shutil.which("sbatch") is None,
                                 reason="sbatch is not on PATH: no Slurm cluster here (CI "
                                 "starts a one-node cluster with .ci/slurm-up)")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """The reference: the same sweep run in this process."""
    out = tmp_path_factory.mktemp("local") / "detect"
    assert detect.main([*SWEEP, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for this module; its workers import this checkout."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def launch_args(out: Path, launcher: str, *extra: str) -> list[str]:
    return [*SWEEP, "--out", str(out), "--launcher", launcher, "--jobs", "2", *extra]


def assert_same_as_local(out: Path, local: Path, launcher: str, n_jobs: int) -> dict:
    assert (out / "head_score.json").read_bytes() == (local / "head_score.json").read_bytes()
    assert (out / "trials.jsonl").read_bytes() == (local / "trials.jsonl").read_bytes()
    launch = load_result(out).meta["extra"]["launch"]
    assert launch["launcher"] == launcher and launch["shards"] == 2
    assert len(launch["job_ids"]) == n_jobs
    hosts = launch["cell_hosts"]
    assert len(hosts) == 18 and set(hosts.values()) == {socket.gethostname()}
    return launch


def run_and_kill(args: list[str], out: Path, kill) -> tuple[int, list[str]]:
    """Run ``detect.main(args)`` in a thread; once shard 1/2 has written its first cell, call
    ``kill(attempt)`` on its attempt record.  Returns the exit status and the units shard 1 had
    finished when it was killed."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("rc", detect.main(args)))
    thread.start()
    deadline = time.time() + 300
    attempt, done = None, []
    while time.time() < deadline and thread.is_alive():
        found = [json.loads(p.read_text()) for p in (out / "launch" / "attempts").glob("1of2*")]
        if found:
            attempt = found[0]
            done = sorted(finished_units(out) & set(attempt["units"]))
            if done:
                kill(attempt)
                break
        time.sleep(0.05)
    thread.join(timeout=300)
    assert attempt is not None and done, "shard 1/2 never wrote a cell"
    assert len(done) < len(attempt["units"]), "shard 1/2 finished before it could be killed"
    return box["rc"], done


def check_recovery(out: Path, local: Path, args: list[str], done: list[str], launcher: str,
                   capsys) -> None:
    err = capsys.readouterr().err
    assert "shard 1/2 (job" in err and "failed" in err and "--shard 1/2" in err
    assert "rerun the same command" in err
    assert not (out / "head_score.json").exists()
    written = {u: (out / f"{u}.json").stat().st_mtime_ns for u in done}
    assert detect.main(args) == 0
    assert "submitted 1 of 2 shards" in capsys.readouterr().err
    assert {u: (out / f"{u}.json").stat().st_mtime_ns for u in done} == written  # kept
    launch = assert_same_as_local(out, local, launcher, n_jobs=1)
    assert len(launch["attempts"]) == 3


# ------------------------------------------------------------------------------------ Slurm


@needs_slurm
@pytest.mark.slow
def test_slurm_sweep_equals_a_local_run(local_run, tmp_path):
    out = tmp_path / "slurm"
    assert detect.main(launch_args(out, "submitit")) == 0
    launch = assert_same_as_local(out, local_run, "submitit", n_jobs=2)
    assert all("_" in j for j in launch["job_ids"])  # array tasks
    assert len(list((out / "launch" / "slurm").glob("*_log.err"))) == 2


@needs_slurm
@pytest.mark.slow
def test_slurm_cancelled_task_is_resubmitted_alone(local_run, tmp_path, capsys):
    out = tmp_path / "slurm"
    args = launch_args(out, "submitit")
    rc, done = run_and_kill(args, out, lambda a: subprocess.run(["scancel", a["job_id"]],
                                                                 check=True))
    assert rc == 2
    check_recovery(out, local_run, args, done, "submitit", capsys)


# -------------------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_sweep_equals_a_local_run(local_run, ray_cluster, tmp_path):
    out = tmp_path / "ray"
    assert detect.main(launch_args(out, "ray")) == 0
    assert_same_as_local(out, local_run, "ray", n_jobs=2)
    assert (out / "launch" / "ray" / "shard0of2.log").is_file()


@pytest.mark.slow
def test_ray_killed_worker_is_resubmitted_alone(local_run, ray_cluster, tmp_path, capsys):
    out = tmp_path / "ray"
    args = launch_args(out, "ray")
    rc, done = run_and_kill(args, out, lambda a: os.kill(a["pid"], signal.SIGKILL))
    assert rc == 2
    check_recovery(out, local_run, args, done, "ray", capsys)


@pytest.mark.slow
def test_ray_ablation_and_cot_equal_local_runs(local_run, ray_cluster, tmp_path):
    runs = {
        ablate: ["--scores", str(local_run), "--ks", "2", "--draws", "1", "--lengths", "96",
                 "--depths", "0", "100", "--n-needles", "1", "--max-new-tokens", "8"],
        cot: ["--scores", str(local_run), "--ks", "2", "--draws", "1", "--n-multihop", "3",
              "--max-new-tokens", "16"],
    }
    for module, args in runs.items():
        name = module.__name__.split(".")[-1]
        here, there = tmp_path / f"{name}-local", tmp_path / f"{name}-ray"
        assert module.main([*args, "--quiet", "--out", str(here)]) == 0
        assert module.main([*args, "--quiet", "--out", str(there), "--launcher", "ray",
                            "--jobs", "2"]) == 0
        assert (there / "summary.json").read_bytes() == (here / "summary.json").read_bytes()
        assert sorted(finished_units(there)) == sorted(finished_units(here))
        assert load_result(there).meta["extra"]["launch"]["launcher"] == "ray"


# ---------------------------------------------------------------------------- before submitting


@pytest.mark.parametrize("extra, message", [
    (["--launcher", "slurm"], "invalid choice: 'slurm'"),
    (["--launcher", "ray", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--jobs", "3"], "--jobs needs --launcher submitit or ray"),
    (["--launcher", "ray", "--ray-address", "127.0.0.1:1"],
     "--ray-address 127.0.0.1:1: no Ray cluster answers there"),
    (["--launcher", "ray", "--shard", "0/2"], "the launcher shards the sweep itself"),
    (["--launcher", "ray", "--executor-config", "{bad}"], "unknown key(s) partitions"),
    (["--launcher", "ray", "--executor-config", "{slurm}"], "partition is not read by the ray"),
])
def test_bad_launch_settings_are_refused_before_anything_runs(tmp_path, capsys, extra,
                                                              message):
    (tmp_path / "bad.toml").write_text('partitions = "gpu"\n')
    (tmp_path / "slurm.toml").write_text('partition = "gpu"\n')
    extra = [e.format(bad=tmp_path / "bad.toml", slurm=tmp_path / "slurm.toml") for e in extra]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    try:
        rc = detect.main([*SWEEP, "--out", str(out), *extra])
    except SystemExit as stop:  # argparse's own refusal
        rc = stop.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_submitit_without_sbatch_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "out"
    assert cot.main(["--out", str(out), "--launcher", "submitit", "--jobs", "2"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
    assert not out.exists()


def test_executor_file_is_read_and_checked(tmp_path):
    path = tmp_path / "slurm.toml"
    path.write_text('partition = "gpu"\ngpus_per_task = 1\ntimeout_min = 600\n'
                    'setup = ["module load cuda", "source ~/venv/bin/activate"]\n')
    assert read_executor_config(path, "submitit") == {
        "partition": "gpu", "gpus_per_task": 1, "timeout_min": 600,
        "setup": ["module load cuda", "source ~/venv/bin/activate"]}
    path.write_text("cpus_per_task = 0\n")
    with pytest.raises(LaunchError, match="cpus_per_task must be positive"):
        read_executor_config(path, "ray")
    path.write_text('timeout_min = "1h"\n')
    with pytest.raises(LaunchError, match="timeout_min = '1h' has the wrong type"):
        read_executor_config(path, "submitit")
    path.write_text("partition = \n")
    with pytest.raises(LaunchError, match="not valid TOML"):
        read_executor_config(path, "submitit")


def test_plan_shards_units_and_skips_finished_shards(tmp_path):
    units = [unit(f"c{i}") for i in range(5)] + [unit("c0", "top-2")]
    plan = Plan.make(tmp_path, units, jobs=4)
    assert [plan.shard(i) for i in range(4)] == [
        ["cells/c0", "cells/c4"], ["cells/c1", "conditions/top-2/cells/c0"], ["cells/c2"],
        ["cells/c3"]]
    for u in ("cells/c1", "cells/c3", "conditions/top-2/cells/c0"):
        (tmp_path / f"{u}.json").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{u}.json").write_text("{}")
    (tmp_path / "cells" / "c4.npz").write_text("")  # arrays without a record: not finished
    assert plan.unfinished_shards() == [0, 2]
    assert Plan.make(tmp_path, units[:2], jobs=8).n_shards == 2
    text = plan.describe(LaunchSettings("ray", 4))
    assert "6 cells" in text and "3 finished" in text and "2 to submit" in text
    assert "shard 1/4: 2 cells, 0 unfinished (skipped)" in text


def test_jobs_do_not_see_the_launch_options():
    argv = ["--model", "m", "--launcher", "ray", "--jobs=4", "--executor-config", "f.toml",
            "--ray-address=auto", "--dry-run", "--out", "o"]
    assert _cli.worker_argv(argv) == ["--model", "m", "--out", "o"]


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert detect.main([*SWEEP, "--out", str(out), "--launcher", "ray", "--jobs", "5",
                        "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "18 cells" in text and "0 finished; 5 shards, 5 to submit as ray jobs" in text
    assert "shard 4/5: 3 cells, 3 unfinished" in text and "cpus_per_task=1" in text
    assert not out.exists()
