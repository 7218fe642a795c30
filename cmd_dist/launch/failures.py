"""What failed (docs/reliability.md): a lost worker or node (the driver restarts the peer group) or the training
code (the run fails at once, with the worker's traceback), and the one line that says so."""

from __future__ import annotations

import errno
import re
import time
from pathlib import Path

from cmd_dist.config import ConfigError
from cmd_dist.errors import first_line
from cmd_dist.launch import environment  # noqa: F401 - Ray's environment defaults, before Ray is imported
from cmd_dist.runs.run_folder import worker_records

# isort: split
import ray
from ray.train import WorkerGroupError


class TrainingCodeError(RuntimeError):
    """An exception raised by the training code in a worker, with the worker's traceback as text."""

    def __init__(self, rank: int, kind: str, message: str, tb: str, errno_: int | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.rank, self.kind, self.message, self.tb, self.errno = rank, kind, message, tb, errno_

    def __reduce__(self):
        return (self.__class__, (self.rank, self.kind, self.message, self.tb, self.errno))


class RunFailed(RuntimeError):
    """The run cannot go on: ``str(e)`` is the one line to print, ``detail`` the traceback (if any)."""

    def __init__(self, message: str, detail: str = "", code: int = 1) -> None:
        super().__init__(message)
        self.detail, self.code = detail, code


def lost_workers(error: WorkerGroupError) -> dict[int, str]:
    """Ranks whose worker process (or node) is gone, with Ray's reason; empty when all errors are the code's.

    A dead actor reaches the driver as Ray Train's WorkerHealthCheckFailedError wrapping a
    ``ray.exceptions.RayActorError`` (ActorDiedError: process killed, node lost). Everything else,
    e.g. our TrainingCodeError or a peer's collective failing because its partner died, is not a loss.
    Pinned by tests/integration/test_faults.py::test_lost_worker_classification_matches_ray.
    """
    lost = {}
    for rank, err in error.worker_failures.items():
        inner = getattr(err, "health_check_failure", err)
        if isinstance(inner, ray.exceptions.RayActorError) or isinstance(err, ray.exceptions.RayActorError):
            lost[rank] = first_line(inner)
    return lost


#: A collective that broke because its partner's process or node vanished (gloo, NCCL).
_COMM_ERROR = re.compile(r"gloo|nccl|connection reset|connection closed|DistBackendError|DistNetworkError", re.I)

#: Seconds to wait for Ray to mark a vanished node dead (its GCS health check) before calling an error the code's.
NODE_LOSS_WAIT_S = 30.0


def lost_nodes(error: WorkerGroupError, run_dir: Path | str, timeout: float = NODE_LOSS_WAIT_S) -> dict[int, str]:
    """Ranks that ran on a node the cluster has lost, when every failure is a collective breaking.

    A node removed at once (machine gone, raylet killed) reaches the driver first as the surviving workers'
    collective errors (gloo: "Connection reset by peer"), before Ray's health check of the dead worker
    fails, and Ray Train reports only those. The workers' records (``workers/rank<r>.json``: ``node_id``,
    written at every start) and the cluster's node table tell whether a worker's node is gone; Ray marks
    it dead within its health-check period, so this waits up to ``timeout``. Other errors return at once.
    Pinned by tests/integration/test_cluster.py::
    test_spread_peers_on_two_nodes_survive_a_lost_node_and_equal_single_node.
    """
    failures = list(error.worker_failures.values())
    if not failures or not all(
        isinstance(f, TrainingCodeError) and _COMM_ERROR.search(f"{f.kind}: {f.message}") for f in failures
    ):
        return {}
    where: dict[int, str] = {}
    try:
        records = worker_records(run_dir)
    except (OSError, ConfigError):
        records = []  # the URI cannot be read right now: nothing to tell
    for info in records:
        try:
            where[int(info["rank"])] = str(info["node_id"])
        except (ValueError, KeyError, TypeError):
            continue  # a run without Ray node records (or a damaged one): nothing to tell
    if not where:
        return {}
    deadline = time.monotonic() + timeout
    while True:
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        lost = {r: f"its node {nid[:8]} left the cluster" for r, nid in sorted(where.items()) if nid not in alive}
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(0.5)


def code_error(error: WorkerGroupError) -> TrainingCodeError | BaseException:
    """The first training-code exception among the workers' failures (lowest rank), else any failure."""
    failures = dict(sorted(error.worker_failures.items()))
    for err in failures.values():
        if isinstance(err, TrainingCodeError):
            return err
    return next(iter(failures.values()), error)


#: errnos that mean "the disk cannot take the run's files": a one-line error, never a retry. (Permission
#: errors keep their traceback: they may come from any file, not only the run folder.)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def failed_line(err: BaseException, run_dir: Path | str) -> str:
    resume = f"cmd-dist train --resume {run_dir}"
    if isinstance(err, TrainingCodeError):
        if err.errno in WRITE_ERRNOS:
            return (
                f"cannot write to the run folder ({err.kind}: {err.message}); free space (or use a "
                f"writable output_dir), then continue with: {resume}"
            )
        return (
            f"the training code raised {err.kind} in worker {err.rank}: {err.message} (not retried; the run "
            f"folder {run_dir} is kept; fix the cause, then continue with: {resume})"
        )
    return f"training failed: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}"
