"""On a multi-node cluster ``output_dir`` must be one place for every node: a token file written here is read back
by a task on every node before any worker starts."""

from __future__ import annotations

import uuid
from typing import Any

from cmd_dist.config import ConfigError
from cmd_dist.launch import environment  # noqa: F401 - Ray's environment defaults, before Ray is imported
from cmd_dist.launch.cluster import alive_nodes
from cmd_dist.runs.fs import join, open_folder, split_location
from cmd_dist.runs.run_folder import read_run_file, write_run_file

# isort: split
import ray

#: Seconds the output_dir visibility probe waits for every node's answer.
PROBE_TIMEOUT_S = 60.0


def nodes_missing_file(folder: str, name: str, token: str, timeout: float = PROBE_TIMEOUT_S) -> list[dict[str, Any]]:
    """The alive nodes on which ``folder/name`` does not hold ``token`` (one zero-CPU task pinned to each node).

    ``folder`` may be a URI: each node then reads the token through pyarrow, with its own credentials.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def read_token(path: str) -> str | None:
        try:
            data = read_run_file(*split_location(path))
            return data.decode() if data is not None else None
        except (OSError, ConfigError, ValueError):
            return None

    nodes = alive_nodes()
    refs = [
        read_token.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            str(join(folder, name))
        )
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    missing = []
    for node, ref in zip(nodes, refs):
        seen = ray.get(ref, timeout=1) if ref in ready else None
        if seen != token:
            missing.append(node)
    return missing


def check_shared_output(output_dir: str) -> None:
    """On a multi-node cluster ``output_dir`` must be the same place for every node (NFS or similar, or a URI).

    A token file written here is read back by a task on every node; a node that cannot read it means the
    folder is local to this machine (or, for a URI, that node cannot reach it: a ``file://`` URI of a local
    folder, missing credentials), and the run is refused (one line) before any worker starts.
    """
    if len(alive_nodes()) < 2:
        return
    token = uuid.uuid4().hex
    name = f".cmd-dist-shared-{token[:12]}"
    write_run_file(output_dir, name, token.encode())
    try:
        missing = nodes_missing_file(output_dir, name, token)
    finally:
        open_folder(output_dir).delete_file(name)
    if missing:
        raise ConfigError(shared_output_error(output_dir, missing, len(alive_nodes())))


def shared_output_error(output_dir: str, missing: list[dict[str, Any]], total: int) -> str:
    where = ", ".join(f"{n.get('NodeManagerAddress', '?')} ({str(n.get('NodeID', ''))[:8]})" for n in missing[:3])
    if open_folder(output_dir).local is None:  # a URI
        return (
            f"output_dir: {output_dir}: {len(missing)} of the cluster's {total} nodes cannot read what this machine "
            f"wrote there ({where}); use a URI every node reaches with its own credentials (a file:// URI must "
            f"name a folder shared by every node)"
        )
    return (
        f"output_dir: {output_dir} is local to this machine: {len(missing)} of the cluster's {total} nodes "
        f"cannot see it ({where}); use a folder shared by every node at the same path (NFS or similar)"
    )
