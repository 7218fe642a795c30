"""The local Ray is locked (issue 18.1): loopback only, token authentication on, a client without the token refused.

One Ray start for the module: the local default exactly as ``cmd-dist train`` starts it (``cluster.init_ray`` with
no address), in a subprocess with its own home folder and none of the tests' token variables, so the token is the
one cmd-dist and Ray create for a local cluster.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO

HOST = """
import json, os, sys
from cmd_dist.launch import cluster
from cmd_dist.config import load_config
cluster.init_ray(load_config(None))
import ray
ray.get(ray.remote(lambda: 0).remote())  # a worker process listens too
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "pid": os.getpid()}), flush=True)
sys.stdin.read()  # until the test closes stdin
"""

CLIENT = """
import sys, ray
ray.init(address=sys.argv[1], logging_config=ray.LoggingConfig(log_level="ERROR"))
print("CONNECTED", ray.get(ray.remote(lambda: 41 + 1).remote()), flush=True)
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": REPO, **extra}


@pytest.fixture(scope="module")
def local_default(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = _clean_env(HOME=str(home))
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the launcher alone must keep Ray on 127.0.0.1
    proc = subprocess.Popen(
        [sys.executable, "-c", HOST],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    line = _read_line(proc.stdout, timeout=300)
    try:
        assert line, "the local Ray did not start"
        info = json.loads(line)
        info["home"] = home
        yield info
    finally:
        proc.stdin.close()
        proc.wait(60)
        # The reaper (local_ray.start_reaper) takes every Ray process down with the host; kill the group regardless.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _read_line(stream, timeout: float) -> str:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else ""


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def _listening_sockets() -> dict[int, str]:
    """Socket inode -> local address of every listening TCP socket (IPv4 and IPv6) on the machine."""
    out = {}
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, _, hex_port = fields[1].partition(":")
            raw = bytes.fromhex(hex_ip)
            # /proc/net writes each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width // 2, 4))
            out[int(fields[9])] = f"{ipaddress.ip_address(raw)}:{int(hex_port, 16)}"
    return out


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _listeners_of(pids: set[int]) -> list[tuple[int, str]]:
    sockets = _listening_sockets()
    found = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in sockets:
                    found.append((pid, sockets[inode]))
    return found


@pytest.mark.ray
def test_the_local_default_listens_on_loopback_only_with_a_private_token(local_default):
    """Every port of every process of cmd-dist's local Ray is on 127.0.0.1 (or ::1), the GCS's among them; its
    token is Ray's default file, readable by this user only."""
    listeners = _listeners_of(_descendants(local_default["pid"]))
    gcs_port = local_default["gcs"].rsplit(":", 1)[1]
    assert any(addr.endswith(":" + gcs_port) for _, addr in listeners), listeners  # the scan sees Ray's ports
    assert len({pid for pid, _ in listeners}) >= 3, listeners  # GCS, raylet, workers, agents ...
    exposed = [(pid, addr) for pid, addr in listeners if not _is_loopback(addr)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    token = Path(local_default["home"]) / ".ray" / "auth_token"
    assert token.is_file() and len(token.read_text().strip()) == 64
    assert token.stat().st_mode & 0o077 == 0, oct(token.stat().st_mode)


def _client(address: str, env: dict[str, str]) -> tuple[bool, str]:
    """(connected, what it printed): a client that is refused retries for ~20 s; stop it at the first refusal."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, address],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            seen.append(line)
            if "CONNECTED" in line or "Unauthenticated" in line:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(180)
    proc.kill()
    proc.wait(30)
    text = "".join(seen)
    return "CONNECTED 42" in text, text[-2000:]


@pytest.mark.ray
def test_a_client_without_the_token_is_refused(local_default):
    token = (Path(local_default["home"]) / ".ray" / "auth_token").read_text().strip()
    address = local_default["gcs"]
    base = dict(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # the client stays on 127.0.0.1 too
    ok, text = _client(address, _clean_env(RAY_AUTH_MODE="disabled", **base))  # sends no token at all
    assert not ok and "Unauthenticated" in text, text
    ok, text = _client(address, _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64, **base))
    assert not ok and "Unauthenticated" in text, text
    ok, text = _client(address, _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, **base))
    assert ok, text


def test_cluster_definitions_switch_token_authentication_on():
    """`ray up` (docker/cluster.yaml) and KubeRay (docker/rayjob.yaml) start token-protected clusters; nothing in
    the repository switches Ray's authentication off."""
    import yaml

    cluster = yaml.safe_load(Path(REPO, "docker", "cluster.yaml").read_text())
    assert "--env=RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]  # every process in every container
    assert cluster["file_mounts"].get("/home/ray/.ray/auth_token")  # the token, where Ray looks by default
    rayjob = yaml.safe_load(Path(REPO, "docker", "rayjob.yaml").read_text())
    auth = rayjob["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    # setdefault("RAY_AUTH_MODE", "disabled"), RAY_AUTH_MODE="disabled", `export RAY_AUTH_MODE ?= disabled`, YAML
    setting = re.compile(
        r"""RAY_AUTH_MODE(["']\s*[,:]\s*["']|\s*=\s*["']|\s*\?=\s*|:\s*)disabled|--env=RAY_AUTH_MODE=disabled"""
    )
    offenders = []
    for folder in ("cmd_dist", "tune", "tests", "benchmarks", "docker", "configs"):
        for path in Path(REPO, folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".yaml", ".yml", "") and path.name != "test_security.py":
                if setting.search(path.read_text(errors="replace")):
                    offenders.append(str(path))
    if setting.search(Path(REPO, "Makefile").read_text()):
        offenders.append("Makefile")
    assert not offenders, offenders


def test_joining_without_a_token_is_one_line(tmp_path):
    """`--address` with token authentication on (cmd-dist's default) and no token anywhere on this machine: one
    line naming where the token goes, exit 2, before anything is sent (Ray checks for a token first)."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # answers TCP (the reachability check), never Ray
        port = server.getsockname()[1]
        env = _clean_env(HOME=str(tmp_path))
        out = subprocess.run(
            [sys.executable, "-m", "cmd_dist.cli", "train", "configs/demo.yaml", "--address", f"127.0.0.1:{port}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    lines = [line for line in out.stderr.strip().splitlines() if line.startswith("cmd-dist: error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and "RAY_AUTH_TOKEN" in lines[0] and "Traceback" not in out.stderr, out.stderr[-3000:]
