"""Running a sweep's shards on a cluster: Slurm through submitit, or Ray.

A sweep (detection, ablation, chain of thought) is a list of *units*, the records it writes into
its :class:`~rh_lens.store.SweepStore` (``cells/<key>``, ``conditions/<name>/cells/<key>``).
:class:`Plan` splits them into shards with the store's one shard function; each job runs the
sweep's own command on one shard (``--shard I/N``), loading the model once and writing into the
same store, so a job killed halfway loses at most the cell it was on.  :func:`drive` is the one
loop for every launcher: it submits the shards that have unfinished units, shows progress over
the finished records, reports failed jobs with the tail of their log and returns the run's
provenance; the command then writes its outputs as a local run does.
"""

from rh_lens.launch.driver import drive
from rh_lens.launch.plan import LAUNCHERS, LaunchError, LaunchSettings, Plan, read_executor_config

__all__ = ["LAUNCHERS", "LaunchError", "LaunchSettings", "Plan", "drive", "read_executor_config"]
