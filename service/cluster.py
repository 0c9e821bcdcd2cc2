"""Connecting to Ray: an existing cluster (RAY_ADDRESS or an explicit address) or a private local one; and
starting a Ray head with its Jobs API for the control plane."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import httpx
import ray

log = logging.getLogger(__name__)

# Ray Data and Ray Train log every operator and report; the CLI shows its own progress instead.
QUIET_LOGGERS = ("ray.data", "ray.train", "ray.tune")


def connect(
    address: str | None = None, *, num_cpus: int | None = None, temp_dir: str | None = None, quiet: bool = True
) -> None:
    """Attach to ``address`` (or RAY_ADDRESS), or start a local cluster that belongs to this process.

    ``address="local"`` always starts a new cluster, never attaching to one already running on the machine.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = {}
    if address == "local":
        kwargs = {"num_cpus": num_cpus, "_temp_dir": temp_dir}
    ray.init(
        address=address,
        include_dashboard=False if address == "local" else None,
        logging_level=logging.WARNING if quiet else logging.INFO,
        log_to_driver=not quiet,
        configure_logging=True,
        **kwargs,
    )
    if quiet:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


# Niceness of a local head started by the control plane (0 = the server's own priority, 19 = the lowest).
HEAD_NICENESS = 10


@dataclass
class Head:
    """A Ray head started by ``start_head``: its addresses, token and the ``ray start --block`` process."""

    gcs_address: str
    dashboard_url: str
    token: str
    pid: int
    temp_dir: str


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _head_ready(head: Head, timeout: float = 2.0) -> bool:
    try:
        r = httpx.get(
            f"{head.dashboard_url}/api/version", headers={"Authorization": f"Bearer {head.token}"}, timeout=timeout
        )
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def start_head(
    state_dir: str | Path, *, num_cpus: int | None = None, num_gpus: int | None = None, timeout: float = 180.0
) -> Head:
    """A Ray head with its dashboard (Jobs API) and token auth, in its own process group under ``state_dir``.

    The head outlives the process that started it (a crashed control plane finds its jobs still running);
    a later call with the same ``state_dir`` reuses it. ``stop_head`` ends it and everything it started.
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)  # it holds the Ray token: for the service's user alone
    record = state / "head.json"
    if record.exists():
        head = Head(**json.loads(record.read_text()))
        if _alive(head.pid) and _head_ready(head):
            return head
        record.unlink()
    token_file = state / "token"
    if not token_file.exists():
        _write_private(token_file, secrets.token_hex(32))
    token = token_file.read_text().strip()
    # Ray's socket paths must stay short (107 bytes): its temp dir lives under /tmp, named after state_dir.
    temp_dir = f"/tmp/nst-ray-{hashlib.sha1(str(state).encode()).hexdigest()[:10]}"
    port, dashboard_port = free_port(), free_port()
    args = [
        os.path.join(os.path.dirname(sys.executable), "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        args.append(f"--num-gpus={num_gpus}")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # Job entry points (`nstudent job ...`) run from this environment's bin folder.
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    env.pop("RAY_ADDRESS", None)
    log_file = open(state / "head.log", "ab")
    # The head and every Ray process under it run at a lower CPU priority than the API server on the same
    # machine: jobs still take every idle core, but a saturated machine keeps answering API calls quickly.
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: os.nice(HEAD_NICENESS),
    )
    head = Head(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", token, proc.pid, temp_dir)
    deadline = time.time() + timeout
    while not _head_ready(head):
        if proc.poll() is not None or time.time() > deadline:
            stop_head(head)
            raise RuntimeError(f"the Ray head did not start; see {state / 'head.log'}")
        time.sleep(1)
    _write_private(record, json.dumps(asdict(head)))
    return head


def _write_private(path: Path, text: str) -> None:
    """Write a file that holds a secret, readable by its owner only from the moment it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)  # a file that was there before keeps its old mode through O_CREAT


def stop_head(head: Head, grace: float = 30.0, timeout: float = 30.0) -> None:
    """Stop a head from ``start_head`` in Ray's order: SIGTERM to its raylet, which stops its workers and leaves
    the GCS (half a second); then SIGTERM to the GCS alone (each at most ``grace`` seconds). Only then SIGTERM to
    the rest of the process group, and after a few seconds SIGKILL to what is left, such as `ray start --block`
    and the autoscaler's monitor, which would otherwise retry the gone GCS for a minute. (`ray start --block`
    answers SIGTERM by draining its node through the GCS for up to 30 s: signalled while the GCS is still up,
    the two could hold each other's shutdown for that long.) Without /proc: SIGTERM to the group, then SIGKILL."""
    by_name = os.path.exists("/proc/self/stat")
    for name in ("raylet", "gcs_server") if by_name else ():
        try:
            for pid in _group(head.pid).get(name, []):
                os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not _wait(head.pid, grace, partial(_gone, head.pid, name)):
            log.warning("the Ray head's %s did not exit within %.0fs of SIGTERM", name, grace)
    for group_signal, wait in ((signal.SIGTERM, REST_GRACE_SECONDS if by_name else grace), (signal.SIGKILL, timeout)):
        try:
            os.killpg(head.pid, group_signal)
        except ProcessLookupError:
            return
        _wait(head.pid, wait, lambda: False)


# What the head's other processes (dashboard, monitors, agents, `ray start --block`) get between SIGTERM and
# SIGKILL, once the raylet and the GCS are gone.
REST_GRACE_SECONDS = 3.0


def _gone(pgid: int, name: str | None) -> bool:
    return name is not None and name not in _group(pgid)


def _wait(pid: int, timeout: float, done: Callable[[], bool]) -> bool:
    """Until ``pid`` has exited (reaped, when it is our child) or ``done()``; whether either came in time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pid) or done():
            return True
        time.sleep(0.2)
    return False


def _group(pgid: int) -> dict[str, list[int]]:
    """The live (not zombie) processes of process group ``pgid`` by command name (Linux /proc)."""
    names: dict[str, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone while we looked
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if rest[0] != "Z" and int(rest[2]) == pgid:  # state, ppid, pgrp
            names.setdefault(name, []).append(int(stat.parent.name))
    return names
