"""The worker's reporter: Ray Train's report API, where the worker runs, and one progress bar for the run."""

from __future__ import annotations

import re
from typing import Any

from cmd_dist.launch import environment  # noqa: F401 - Ray's environment defaults, before Ray is imported

# isort: split
import ray
import ray.train


class RayReporter:
    """Ray Train's report API behind the engine's Reporter protocol (checkpoints live in the run folder)."""

    def __init__(self, progress: bool = False) -> None:
        self._show_progress = progress
        self._bar: _RunBar | None = None

    def report(self, metrics: dict[str, Any]) -> None:
        ray.train.report(metrics)

    def worker_info(self) -> dict[str, Any]:
        """Where this worker runs, for ``workers/rank<r>.json`` (which peers ran on which Ray node)."""
        node_id = ray.get_runtime_context().get_node_id()
        # The address the node joined the cluster with (127.0.0.1 on a loopback cluster), from the node table.
        ip = next((n.get("NodeManagerAddress") for n in ray.nodes() if n.get("NodeID") == node_id), None)
        return {"node_id": node_id, "node_ip": ip or ray.util.get_node_ip_address()}

    def progress(self, total: int, desc: str) -> Any:
        if not self._show_progress:
            return None
        if self._bar is None:
            self._bar = _RunBar()
        return self._bar.start_epoch(total, desc)

    def close_bars(self) -> None:
        """Close the bar a failing epoch left open: the driver would otherwise redraw it above every later line."""
        if self._bar is not None:
            try:
                self._bar._last = True
                self._bar.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            self._bar = None


_EPOCH_DESC = re.compile(r"epoch (\d+)/(\d+)")


class _RunBar:
    """One ``tqdm_ray`` bar for the whole run, reset at each epoch.

    The driver draws a worker's tqdm_ray bars and keeps the line of every closed bar; one bar per
    epoch would leave a bar line beside every epoch line. This one is reused and closed only after
    the last epoch's steps, long before the run ends, so the final lines print below it.
    """

    def __init__(self) -> None:
        from ray.experimental.tqdm_ray import tqdm

        self._bar = tqdm(total=1, desc="")
        self._last = False

    def start_epoch(self, total: int, desc: str) -> _RunBar:
        match = _EPOCH_DESC.search(desc)
        self._last = bool(match) and int(match.group(1)) >= int(match.group(2))
        self._bar.n = 0
        self._bar.total = total
        self._bar.set_description(desc)
        return self

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        if self._last:
            self._bar.close()
        else:
            self._bar.refresh()
