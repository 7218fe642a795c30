"""``cmd-dist submit CONFIG [key=value ...] --address http://HEAD:8265``: a training as a Ray Job.

The config and overrides are checked here first (one line, exit 2, nothing submitted); then the current folder
(or ``--working-dir``) is uploaded as the job's working dir (``runtime_env.working_dir``, first on the job's
PYTHONPATH: when it holds ``cmd_dist/``, the cluster runs that code, else the cluster's installed cmd-dist) and
the job's entrypoint is ``python -m cmd_dist.cli train CONFIG ... --address auto`` on the head node (no need for
a ``cmd-dist`` script on the cluster's PATH). The talks with the cluster go through Ray's public Jobs client (the
dashboard's HTTP API), presenting the cluster's token (Ray's token authentication: ``RAY_AUTH_TOKEN``, the file
``RAY_AUTH_TOKEN_PATH``, or Ray's default ``~/.ray/auth_token``); Ray's own packaging log lines are kept quiet.

A job runs in a temporary copy of the working dir on the head node, so ``output_dir`` must be absolute (a
folder every node shares) or a URI (s3://...), and CIFAR's ``data.root`` absolute; the run name is fixed
here so the printed run folder is where the job writes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from cmd_dist.config import Config, ConfigError, load_config

#: Seconds to wait for the dashboard to answer before calling the address unreachable.
CONNECT_TIMEOUT_S = 10.0
#: Never uploaded with the working dir (besides what .gitignore excludes, which Ray honours).
EXCLUDES = [".venv", "venv", ".git", "runs", "data", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def default_working_dir() -> Path:
    """The folder ``cmd-dist submit`` runs in: the default working dir (the project the user is in)."""
    return Path.cwd()


#: Where Ray keeps a cluster's token when ``ray get-auth-token --generate`` (or ``ray start``) made it.
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
TOKEN_HOWTO = (
    "pass the cluster's token: export RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> (on the head: "
    "ray get-auth-token)"
)


def auth_token() -> tuple[str | None, str]:
    """(the cluster's token or None, where it came from): ``RAY_AUTH_TOKEN``, else the file named by
    ``RAY_AUTH_TOKEN_PATH``, else Ray's default token file, as Ray's own clients look for it."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    path = Path(named or DEFAULT_TOKEN_FILE).expanduser()
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        if named:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH: {named} does not exist; {TOKEN_HOWTO}") from None
        return None, ""
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"RAY_AUTH_TOKEN_PATH: {path} cannot be read ({e}); {TOKEN_HOWTO}") from None
    return (token or None), (f"RAY_AUTH_TOKEN_PATH ({path})" if named else str(path))


def auth_headers() -> dict[str, str]:
    """The HTTP header that presents the token to a cluster with Ray's token authentication (none without one).

    Ray's Jobs client adds it only where the submitting shell itself runs ``RAY_AUTH_MODE=token``; it is
    passed here so a laptop without Ray settings reaches a token-protected cluster all the same."""
    token, _ = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def refused_for_auth(url: str, status: int) -> ConfigError:
    token, where = auth_token()
    if status == 401 or not token:
        return ConfigError(
            f"--address {url}: the cluster requires a Ray auth token and none was presented; {TOKEN_HOWTO}"
        )
    return ConfigError(f"--address {url}: the cluster refused the token from {where}; {TOKEN_HOWTO}")


@contextlib.contextmanager
def quiet_ray_logs() -> Iterator[None]:
    """Ray's packaging and client INFO/WARNING lines ("Pushing file package ...") off the console; errors stay.

    Some of Ray's loggers set their own level (the Jobs client's: INFO), so each is raised, then restored."""
    loggers = [logging.getLogger("ray")]
    loggers += [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("ray.") and isinstance(logging.root.manager.loggerDict[name], logging.Logger)
    ]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def dashboard_url(address: str) -> str:
    address = address.strip().rstrip("/")
    if not address.startswith(("http://", "https://")):
        address = "http://" + address
    return address


def check_dashboard(url: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A one-line ConfigError unless the Ray dashboard (Jobs API) answers at ``url`` within ``timeout``."""
    import requests

    try:
        reply = requests.get(f"{url}/api/version", timeout=timeout, headers=auth_headers())
    except requests.RequestException as e:
        kind = "timed out" if isinstance(e, requests.Timeout) else "connection failed"
        raise ConfigError(
            f"--address {url}: no Ray dashboard answers there ({kind} within {timeout:g} s); start the head with "
            f"the dashboard (ray start --head --dashboard-host=127.0.0.1) and forward its port 8265 "
            f"(ray dashboard CLUSTER.yaml, or ssh -L 8265:127.0.0.1:8265 HEAD), then use http://127.0.0.1:8265"
        ) from None
    if reply.status_code in (401, 403):
        raise refused_for_auth(url, reply.status_code)
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
    working_dir = Path(args.working_dir or default_working_dir()).expanduser().resolve()
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
    # The launch layer's quiet defaults (cmd_dist/launch/environment.py; it cannot pass them to ray.init inside a
    # job: see cmd_dist.launch.cluster.init_ray).
    env_vars = {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env_vars.update(runtime_env.get("env_vars") or {})
    runtime_env["env_vars"] = env_vars
    # The module, not the `cmd-dist` script: a cluster whose Python has cmd-dist (or gets this working dir's
    # cmd_dist/ on its PYTHONPATH) may still lack the script on its PATH.
    entrypoint = " ".join(
        ["python", "-m", "cmd_dist.cli", "train", shlex.quote(rel.as_posix())]
        + [shlex.quote(o) for o in overrides]
        + ["--address", "auto"]
    )
    return entrypoint, runtime_env, cfg


def cmd_submit(args: argparse.Namespace) -> int:
    entrypoint, runtime_env, cfg = build_job(args)
    url = dashboard_url(args.address)
    check_dashboard(url)
    # Imported first: some of Ray's modules set their loggers' levels on import, which the quiet block then lowers.
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    with quiet_ray_logs():
        try:
            client = JobSubmissionClient(url, headers=auth_headers())
            job_id = submit_with_retry(
                client,
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=args.job_id,
                metadata={"cmd_dist_run": cfg.run_name, "output_dir": cfg.output_dir},
            )
        except AuthenticationError as e:
            raise refused_for_auth(url, 401 if "required" in str(e).lower() else 403) from None
    from cmd_dist.runs.fs import join

    run_dir = join(cfg.output_dir, cfg.run_name)
    uploaded = (Path(runtime_env["working_dir"]) / "cmd_dist").is_dir()
    code = "the working dir's cmd_dist/" if uploaded else "the cluster's installed cmd-dist (no cmd_dist/ uploaded)"
    print(f"cmd-dist: submitted job {job_id} to {url}")
    print(f"  entrypoint:  {entrypoint}")
    print(f"  code:        {code}")
    print(f"  run folder:  {run_dir}")
    print(f"  follow logs: ray job logs --follow --address {url} {job_id}")
    print(f"  status:      ray job status --address {url} {job_id}      stop: ray job stop --address {url} {job_id}")
    print(f"  tensorboard: tensorboard --logdir {join(run_dir, 'tb')} --host 127.0.0.1")
    sys.stdout.flush()
    if not args.wait:
        return 0
    return wait_for_job(client, job_id, args.timeout, url=url)


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


def wait_for_job(client: Any, job_id: str, timeout: float, poll_s: float = 2.0, url: str = "") -> int:
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
                f"(ray job stop --address {url} {job_id} to end it)",
                file=sys.stderr,
            )
            return 1
        time.sleep(poll_s)


def add_parser(sub: Any) -> None:
    s = sub.add_parser("submit", help="run a training as a Ray Job on a cluster (through its dashboard)")
    s.add_argument("config", help="YAML config inside the working dir (see configs/)")
    s.add_argument("overrides", nargs="*", help="key=value overrides; output_dir must be shared or a URI")
    s.add_argument("--address", required=True, help="the head's dashboard, e.g. http://127.0.0.1:8265")
    s.add_argument("--working-dir", help="folder uploaded as the job's working dir (default: the current folder)")
    s.add_argument("--runtime-env", metavar="YAML", help="Ray runtime env to add (pip, env_vars, ...)")
    s.add_argument("--job-id", help="submission id (default: Ray picks one)")
    s.add_argument("--wait", action="store_true", help="print the job's log until it ends; exit 0 if it succeeded")
    s.add_argument("--timeout", type=float, default=24 * 3600.0, help="with --wait: give up after this many seconds")
    s.set_defaults(func=cmd_submit)
