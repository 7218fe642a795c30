"""Starting or joining Ray: a fresh local Ray bound to 127.0.0.1, or a cluster checked to answer first; and what
the connected cluster's alive nodes hold."""

from __future__ import annotations

import os
import socket
from typing import Any

from cmd_dist.config import Config, ConfigError
from cmd_dist.errors import first_line
from cmd_dist.launch import environment  # noqa: F401 - Ray's environment defaults, before Ray is imported
from cmd_dist.launch.console import CONSOLE, collapse_forwarded_tracebacks, ray_log_level
from cmd_dist.launch.local_ray import ensure_local_token, free_port, loopback_node, start_reaper

# isort: split
import ray

#: Seconds to wait for a given Ray address to answer before giving up with one line.
CONNECT_TIMEOUT_S = 5.0


def ray_address(cfg: Config) -> str | None:
    """The cluster to join (``ray.address``, else RAY_ADDRESS), or None for a fresh local Ray."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A ``HOST:PORT`` address must accept a TCP connection within ``timeout``; ConfigError otherwise.

    Without this, ray.init on a dead address retries "Failed to connect to GCS" for minutes and
    ignores Ctrl-C. Other forms (``auto``, ``ray://``) are left to Ray.
    """
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (getattr(e, "strerror", None) or str(e))
        raise ConfigError(
            f"ray.address: no Ray cluster answers at {address} ({reason} after {timeout:g} s); start it "
            f"('ray start --head'), fix the address, or leave it out for a local Ray"
        ) from None


_TOKEN_HINT = (
    "give this machine the cluster's token (`ray get-auth-token` on the head prints it): RAY_AUTH_TOKEN=<token> or "
    "RAY_AUTH_TOKEN_PATH=<file>, or put it in ~/.ray/auth_token; RAY_AUTH_MODE=disabled only for a cluster that "
    "runs without authentication"
)


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` / RAY_ADDRESS, or start a fresh local Ray bound to 127.0.0.1, no dashboard."""
    if ray.is_initialized():
        return
    address = ray_address(cfg)
    env_vars = {key: os.environ[key] for key in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",)}
    if not CONSOLE.verbose:
        # Ray Train's preemption watcher only logs spot-node preemptions (failures are handled either way)
        # and makes Ray's core print a C++ error line about its constructor arguments on every run.
        env_vars["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs: dict[str, Any] = dict(
        log_to_driver=True,
        logging_config=ray.LoggingConfig(log_level=ray_log_level()),
    )
    # Ray Train's placement-group cleaner (an actor) finds its cluster through RAY_ADDRESS; without it, on
    # a machine with several Ray instances, it cannot tell which is its own and dies with a traceback.
    chosen_port = None
    local = address is None
    if local:
        # "local": always a new cluster. address=None would join whatever Ray's ray_current_cluster
        # file names (a `ray start` left running, another program's Ray, or one long dead: a hang).
        address = "local"
        kwargs.update(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", include_dashboard=False)
        if not os.environ.get("RAY_GCS_SERVER_PORT"):
            chosen_port = free_port()
            os.environ["RAY_GCS_SERVER_PORT"] = str(chosen_port)  # read by ray.init's local start
        env_vars["RAY_ADDRESS"] = f"127.0.0.1:{os.environ['RAY_GCS_SERVER_PORT']}"
        ensure_local_token()
        start_reaper()
    else:
        check_reachable(address)
    if address != "local" and not address.startswith("ray://"):
        env_vars.setdefault("RAY_ADDRESS", address)
        if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            kwargs["_node_ip_address"] = "127.0.0.1"  # a loopback cluster: this node is 127.0.0.1 too
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        # Inside a Ray Job (cmd-dist submit) the job's runtime env already carries these (cmd_dist/launch/submit.py),
        # and a runtime_env given here would replace the job's, whose working_dir package the workers then
        # could not download.
        kwargs["runtime_env"] = {"env_vars": env_vars}
    try:
        with loopback_node(local):
            ray.init(address=address, **kwargs)
    except ray.exceptions.AuthenticationError as e:
        raise ConfigError(f"ray.address: {address}: {first_line(e)}; {_TOKEN_HINT}") from None
    except ConnectionError as e:
        if local:
            raise
        # A cluster that refuses this client's token answers "Unauthenticated" until ray.init gives up (~20 s).
        raise ConfigError(
            f"ray.address: {address}: {first_line(e)} (a missing or wrong token looks like this too: "
            f"'Unauthenticated' above); {_TOKEN_HINT}"
        ) from None
    finally:
        if chosen_port is not None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
    if not CONSOLE.verbose:
        collapse_forwarded_tracebacks()


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def local_node() -> list[dict[str, float]]:
    """What a fresh local Ray will have (its defaults: every CPU core, every visible CUDA device)."""
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
