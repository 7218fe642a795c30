"""A real multi-node Ray cluster on this machine, for the cluster tests (`tests/integration/test_cluster.py`).

``python -m tests.multinode SPEC.json`` runs in its own process session and hosts the nodes with
``ray.cluster_utils.Cluster``: a head (GCS, optionally the dashboard, on 127.0.0.1) and worker nodes, each a
separate raylet with its own resources and ports, all bound to 127.0.0.1 (``ray start`` would rewrite
127.0.0.1 to the machine's routable address; so does ``ray.init(address=...)`` unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which the tests set). It prints ``READY <gcs address> <head node
id> <worker node ids...>`` and then obeys one command
per line on stdin: ``kill <i>`` removes worker node i without grace (a node lost mid-run), ``stop`` (or
EOF, or SIGTERM) removes every node and exits. Ray's machine-wide "current cluster" file in /tmp/ray is
never written or deleted (the cluster's own temp dir holds it), so other Ray users on the machine are not
redirected to this cluster, nor jobs on this cluster to theirs.

:class:`MultiNodeCluster` is the test side: start, wait (with a timeout), kill a node, stop, and, whatever
happens, kill the helper's whole process group on the way out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiNodeCluster:
    """Head + workers on 127.0.0.1 in a child process group; ``stop()`` is idempotent and always kills."""

    def __init__(self, workers: list[dict], head: dict, temp_dir: Path, dashboard: bool = False) -> None:
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.gcs_port = free_port()
        self.dashboard_port = free_port() if dashboard else None
        spec = {"head": head, "workers": workers, "temp_dir": str(self.temp_dir), "gcs_port": self.gcs_port}
        spec["dashboard_port"] = self.dashboard_port
        spec_path = self.temp_dir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path = self.temp_dir / "cluster.log"
        self._log = open(self.log_path, "w")
        repo = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.multinode", str(spec_path)],
            cwd=repo,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,  # its own process group: stop() can kill everything it started
        )
        self.address = self._wait_ready(timeout=180)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _wait_ready(self, timeout: float) -> str:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith("READY "):
            self.stop()
            raise RuntimeError(f"multi-node Ray cluster did not start in {timeout:.0f} s; log: {self.log_path}")
        _, address, self.head_id, *self.worker_ids = line[0].split()
        return address

    def kill_worker(self, index: int, timeout: float = 60) -> None:
        self.proc.stdin.write(f"kill {index}\n")
        self.proc.stdin.flush()
        done: list[str] = []
        reader = threading.Thread(target=lambda: done.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not done or not done[0].startswith("KILLED"):
            raise RuntimeError(f"worker node {index} was not removed in {timeout:.0f} s; log: {self.log_path}")

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of this helper's process group (raylets, workers it spawned)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _serve(spec_path: str) -> None:
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    spec = json.loads(Path(spec_path).read_text())
    # The cluster's address goes to its own temp dir (where the job supervisor looks it up for a job's
    # RAY_ADDRESS), never to the machine-wide /tmp/ray/ray_current_cluster that other users' ray.init() reads.
    write = ray._private.utils.write_ray_address
    ray._private.utils.write_ray_address = lambda address, temp_dir=None: write(address, spec["temp_dir"])
    ray._common.utils.reset_ray_address = lambda *a, **k: None
    common = dict(node_ip_address="127.0.0.1", temp_dir=spec["temp_dir"], object_store_memory=100 * 1024**2)
    head_args = dict(common, gcs_server_port=spec["gcs_port"], **spec["head"])
    if spec.get("dashboard_port"):
        head_args.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=spec["dashboard_port"])
        # The head's agent serves the Jobs API; Ray's fixed default port may be taken by another Ray here.
        head_args.update(dashboard_agent_listen_port=free_port())
    else:
        head_args.update(include_dashboard=False)
    cluster = Cluster(initialize_head=True, head_node_args=head_args, shutdown_at_exit=True)
    workers = [cluster.add_node(**dict(common, **w)) for w in spec["workers"]]
    cluster.wait_for_nodes(timeout=120)

    def stop(*_):
        cluster.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"READY {cluster.address} {cluster.head_node.node_id} {' '.join(w.node_id for w in workers)}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["kill"]:
            cluster.remove_node(workers[int(cmd[1])], allow_graceful=False)
            print("KILLED", flush=True)
        elif cmd[:1] == ["stop"]:
            break
    stop()


if __name__ == "__main__":
    _serve(sys.argv[1])
