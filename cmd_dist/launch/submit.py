"""``cmd-dist submit CONFIG [key=value ...] --address http://HEAD:8265``: a training as a Ray Job.

The config and overrides are checked here first (one line, exit 2, nothing submitted); then the project
folder is uploaded as the job's working dir (``runtime_env.working_dir``, first on the job's PYTHONPATH, so
the cluster runs this checkout's code) and the job's entrypoint is ``cmd-dist train CONFIG ... --address auto``
on the head node. The talks with the cluster go through Ray's public Jobs client (the dashboard's HTTP API).

A job runs in a temporary copy of the working dir on the head node, so ``output_dir`` must be absolute (a
folder every node shares) or a URI (s3://...), and CIFAR's ``data.root`` absolute; the run name is fixed
here so the printed run folder is where the job writes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cmd_dist.config import Config, ConfigError, load_config

#: Seconds to wait for the dashboard to answer before calling the address unreachable.
CONNECT_TIMEOUT_S = 10.0
#: Never uploaded with the working dir (besides what .gitignore excludes, which Ray honours).
EXCLUDES = [".venv", "venv", ".git", "runs", "data", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def project_root() -> Path:
    """The folder holding this checkout's ``cmd_dist/`` (and pyproject.toml): the default working dir."""
    return Path(__file__).resolve().parent.parent


def dashboard_url(address: str) -> str:
    address = address.strip().rstrip("/")
    if not address.startswith(("http://", "https://")):
        address = "http://" + address
    return address


def check_dashboard(url: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A one-line ConfigError unless the Ray dashboard (Jobs API) answers at ``url`` within ``timeout``."""
    import requests

    try:
        reply = requests.get(f"{url}/api/version", timeout=timeout)
    except requests.RequestException as e:
        kind = "timed out" if isinstance(e, requests.Timeout) else "connection failed"
        raise ConfigError(
            f"--address {url}: no Ray dashboard answers there ({kind} within {timeout:g} s); start the head with "
            f"the dashboard (ray start --head --dashboard-host=127.0.0.1) and forward its port 8265 "
            f"(ray dashboard CLUSTER.yaml, or ssh -L 8265:127.0.0.1:8265 HEAD), then use http://127.0.0.1:8265"
        ) from None
    if reply.status_code != 200:
        raise ConfigError(f"--address {url}: the server answered HTTP {reply.status_code}; is it a Ray dashboard?")


def check_job_config(cfg: Config) -> None:
    """Paths a job on the cluster can use: the job's own folder is a temporary copy on the head node."""
    if "://" not in cfg.output_dir and not Path(cfg.output_dir).is_absolute():
        raise ConfigError(
            f"output_dir: {cfg.output_dir!r} is relative; a submitted job runs in a temporary copy of the working "
            f"dir, so pass output_dir=/shared/runs (a folder every node mounts at the same path) or a URI "
            f"(output_dir=s3://bucket/runs)"
        )
    if cfg.data.dataset != "digits" and not Path(cfg.data.root).is_absolute():
        raise ConfigError(
            f"data.root: {cfg.data.root!r} is relative; pass the dataset folder as the cluster's nodes see it, "
            f"e.g. data.root=/shared/data"
        )


def build_job(args: argparse.Namespace) -> tuple[str, dict[str, Any], Config]:
    """(entrypoint, runtime_env, resolved config), all checked; raises ConfigError on any mistake."""
    working_dir = Path(args.working_dir).expanduser().resolve() if args.working_dir else project_root()
    if not working_dir.is_dir():
        raise ConfigError(f"--working-dir {args.working_dir}: not a folder")
    config = Path(args.config).expanduser().resolve()
    try:
        rel = config.relative_to(working_dir)
    except ValueError:
        raise ConfigError(
            f"CONFIG {args.config}: must be inside the working dir {working_dir} (it is uploaded with it); move "
            f"it there or pass --working-dir"
        ) from None
    overrides = list(args.overrides)
    cfg = load_config(config, overrides)
    check_job_config(cfg)
    if not cfg.run_name:  # fixed now, so the run folder printed here is the one the job writes
        cfg.run_name = time.strftime("cmd-%Y%m%d-%H%M%S")
        overrides.append(f"run_name={cfg.run_name}")
    runtime_env: dict[str, Any] = {}
    if args.runtime_env:
        path = Path(args.runtime_env)
        try:
            runtime_env = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--runtime-env {args.runtime_env}: cannot be read as YAML ({e})") from None
        if not isinstance(runtime_env, dict):
            raise ConfigError(f"--runtime-env {args.runtime_env}: must hold a mapping (pip, env_vars, ...)")
    runtime_env["working_dir"] = str(working_dir)
    runtime_env["excludes"] = sorted(set(runtime_env.get("excludes", [])) | set(EXCLUDES))
    # The launcher's quiet defaults (it cannot pass them to ray.init inside a job: see launcher.init_ray).
    env_vars = {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env_vars.update(runtime_env.get("env_vars") or {})
    runtime_env["env_vars"] = env_vars
    entrypoint = " ".join(
        ["cmd-dist", "train", shlex.quote(rel.as_posix()), *(shlex.quote(o) for o in overrides), "--address", "auto"]
    )
    return entrypoint, runtime_env, cfg


def cmd_submit(args: argparse.Namespace) -> int:
    entrypoint, runtime_env, cfg = build_job(args)
    url = dashboard_url(args.address)
    check_dashboard(url)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)
    job_id = submit_with_retry(
        client,
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=args.job_id,
        metadata={"cmd_dist_run": cfg.run_name, "output_dir": cfg.output_dir},
    )
    from cmd_dist.runs.fs import join

    run_dir = join(cfg.output_dir, cfg.run_name)
    print(f"cmd-dist: submitted job {job_id} to {url}")
    print(f"  entrypoint:  {entrypoint}")
    print(f"  run folder:  {run_dir}")
    print(f"  follow logs: ray job logs --follow --address {url} {job_id}")
    print(f"  status:      ray job status --address {url} {job_id}      stop: ray job stop --address {url} {job_id}")
    print(f"  tensorboard: tensorboard --logdir {join(run_dir, 'tb')} --host 127.0.0.1")
    sys.stdout.flush()
    if not args.wait:
        return 0
    return wait_for_job(client, job_id, args.timeout)


#: Seconds a just-started head may answer "No available agent to submit job" before that is an error.
AGENT_WAIT_S = 120.0


def submit_with_retry(client: Any, timeout: float = AGENT_WAIT_S, **job: Any) -> str:
    """``client.submit_job``, retried while the head's job agent is still starting (a fresh ``ray start``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                lines = [line for line in str(e).splitlines() if line.strip()]
                raise ConfigError(f"the cluster refused the job: {lines[-1] if lines else e}") from None
            time.sleep(2.0)


def wait_for_job(client: Any, job_id: str, timeout: float, poll_s: float = 2.0) -> int:
    """Print the job's log as it grows until it ends (0 if it succeeded) or ``timeout`` seconds pass (1)."""
    deadline = time.monotonic() + timeout
    shown = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in TERMINAL:
            info = client.get_job_info(job_id)
            if status == "SUCCEEDED":
                print(f"cmd-dist: job {job_id} succeeded")
                return 0
            message = (info.message or "").strip().splitlines()
            print(f"cmd-dist: error: job {job_id} {status.lower()}: {message[-1] if message else ''}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print(
                f"cmd-dist: error: job {job_id} still {status.lower()} after {timeout:g} s; it keeps running "
                f"(ray job stop {job_id} to end it)",
                file=sys.stderr,
            )
            return 1
        time.sleep(poll_s)


def add_parser(sub: Any) -> None:
    s = sub.add_parser("submit", help="run a training as a Ray Job on a cluster (through its dashboard)")
    s.add_argument("config", help="YAML config inside the working dir (see configs/)")
    s.add_argument("overrides", nargs="*", help="key=value overrides; output_dir must be shared or a URI")
    s.add_argument("--address", required=True, help="the head's dashboard, e.g. http://127.0.0.1:8265")
    s.add_argument("--working-dir", help="folder uploaded as the job's working dir (default: this checkout)")
    s.add_argument("--runtime-env", metavar="YAML", help="Ray runtime env to add (pip, env_vars, ...)")
    s.add_argument("--job-id", help="submission id (default: Ray picks one)")
    s.add_argument("--wait", action="store_true", help="print the job's log until it ends; exit 0 if it succeeded")
    s.add_argument("--timeout", type=float, default=24 * 3600.0, help="with --wait: give up after this many seconds")
    s.set_defaults(func=cmd_submit)
