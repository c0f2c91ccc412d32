#!/usr/bin/env python3
"""The local stack: a Ray head, moto's S3 server and an MLflow server on 127.0.0.1.

The one-machine stand-in for the production platform (docs/operations.md): the Ray head plays the
cluster (``ray job submit`` works against it), moto's S3 server plays the object store, and the
MLflow server plays the tracking server, with a SQLite backend and its artifacts in moto's S3
(production: PostgreSQL and S3). Tests use it, and so can anyone trying the cluster path.

Terms:
- *state dir*: the folder holding ``state.json`` (PIDs, ports, environment of the running stack)
  and ``logs/``; ``--state-dir`` or ``FRACTALGEN_STACK_DIR``, default
  ``/tmp/fractalgen-stack-<uid>``. One stack per state dir.
- *service*: ``ray``, ``moto`` or ``mlflow``. Each is started in its own session (process group), so
  it and everything it spawns can be found and stopped by its ids, and only those.
- *token*: Ray runs with token authentication (``RAY_AUTH_MODE=token``) and a token made for this
  stack (``<state dir>/ray_auth_token``, mode 600); ``env`` prints where it is for clients.
- *healthy*: the service answers its health check over HTTP: Ray's dashboard ``/api/gcs_healthz``
  and the raylet's ``/api/local_raylet_healthz``, moto's ``GET /`` (bucket list), MLflow's ``/health``.

Commands: ``up`` (start, wait for health with a bounded wait, print the environment), ``status``
(exit 0 only when all three are healthy), ``env`` (``export`` lines for ``eval``), ``down`` (stop
everything the stack started and check that no process of it is left).

``down`` never runs ``ray stop``: that stops every Ray process of the user on the machine, other
people's local clusters included. It stops the processes recorded in the state file, the process
groups and sessions they lead, their descendants, and any process naming the stack's own Ray temp dir.

Only the standard library and psutil (installed with the platform) are used, so the script runs
from any Python that has ``ray``, ``mlflow`` and ``moto`` next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

SERVICES: tuple[str, ...] = ("ray", "moto", "mlflow")
HOST = "127.0.0.1"
BUCKET = "fractalgen"  # created in moto at `up`: MLflow artifacts and anything a test puts there
MLFLOW_ARTIFACTS = f"s3://{BUCKET}/mlflow-artifacts"
STATE_FILE = "state.json"
# moto accepts any credentials; these are the conventional dummies, not secrets
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class StackError(RuntimeError):
    """The stack cannot be started, or a service failed; the message says which and why."""


# ----------------------------------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------------------------------


def default_state_dir() -> Path:
    env = os.environ.get("FRACTALGEN_STACK_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"fractalgen-stack-{os.getuid()}"


def read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(state_dir / STATE_FILE)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _bin(name: str) -> str:
    """The console script ``name`` next to this Python (a venv), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` is not installed next to {sys.executable} nor on PATH")
    return found


def stack_env(state: dict[str, Any]) -> dict[str, str]:
    """The environment a client of the stack needs (also what the Ray head passes to its jobs)."""
    p = state["ports"]
    s3 = f"http://{HOST}:{p['moto']}"
    return {
        # drivers (`ray.init()`, `fractalgen train`) connect to the GCS; `ray job` to the dashboard
        "RAY_ADDRESS": f"{HOST}:{p['ray_gcs']}",
        "RAY_API_SERVER_ADDRESS": f"http://{HOST}:{p['ray_dashboard']}",
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{p['mlflow']}",
        # boto3 >= 1.28, mosaicml-streaming, MLflow's S3 artifact client, and pyarrow (explicitly)
        "AWS_ENDPOINT_URL": s3,
        "AWS_ENDPOINT_URL_S3": s3,
        "S3_ENDPOINT_URL": s3,
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "FRACTALGEN_BUCKET": BUCKET,
        # Ray's token authentication, with this stack's own token (``ray job submit`` and drivers
        # read these; the dashboard answers 401 without the token)
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["ray_token_path"],
        **DUMMY_AWS,
    }


# ----------------------------------------------------------------------------------------------------
# health checks
# ----------------------------------------------------------------------------------------------------


def _http_ok(url: str, timeout: float = 2.0, method: str = "GET") -> bool:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def health(service: str, state: dict[str, Any]) -> bool:
    """One health probe of ``service`` (no waiting)."""
    p = state["ports"]
    if service == "ray":
        return _http_ok(f"http://{HOST}:{p['ray_dashboard']}/api/gcs_healthz") and _http_ok(
            f"http://{HOST}:{p['ray_agent']}/api/local_raylet_healthz"
        )
    if service == "moto":
        return _http_ok(f"http://{HOST}:{p['moto']}/")
    if service == "mlflow":
        return _http_ok(f"http://{HOST}:{p['mlflow']}/health")
    raise ValueError(service)


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text[-lines:])


def wait_healthy(state: dict[str, Any], services: tuple[str, ...], timeout_s: float) -> None:
    """Poll until every service is healthy; raise ``StackError`` on a dead process or the deadline."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    pending = list(services)
    while pending:
        for service in list(pending):
            info = state["services"][service]
            if health(service, state):
                pending.remove(service)
                info["healthy_after_s"] = round(time.monotonic() - t0, 1)
                if service == "moto":
                    _create_bucket(state)
            elif not alive(info["pid"]):
                raise StackError(
                    f"{service} exited during start-up; the end of {info['log']}:\n{_log_tail(info['log'])}"
                )
        if not pending:
            return
        if time.monotonic() > deadline:
            details = "\n".join(f"  {s}: log {state['services'][s]['log']}" for s in pending)
            raise StackError(f"not healthy after {timeout_s:.0f} s: {', '.join(pending)}\n{details}")
        time.sleep(0.25)


def _create_bucket(state: dict[str, Any]) -> None:
    # moto does not check request signatures, so a plain PUT creates the bucket
    url = f"http://{HOST}:{state['ports']['moto']}/{BUCKET}"
    req = urllib.request.Request(url, method="PUT", data=b"")
    try:
        urllib.request.urlopen(req, timeout=5).close()
    except urllib.error.HTTPError as err:
        if err.code != 409:  # already exists
            raise StackError(f"cannot create bucket {BUCKET} in moto: HTTP {err.code}") from None


# ----------------------------------------------------------------------------------------------------
# start
# ----------------------------------------------------------------------------------------------------


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        # a new session: the service and all it spawns share a process group we can signal by id
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip


def up(
    state_dir: Path, *, timeout_s: float = 120.0, ray_cpus: int | None = None, object_store_mb: int = 256
) -> dict:
    """Start the three services, wait until healthy, and return the state (also in ``state.json``).

    On any failure everything already started is stopped again before ``StackError`` is raised.
    """
    old = read_state(state_dir)
    if old is not None:
        if any(alive(info.get("pid")) for info in old.get("services", {}).values()):
            raise StackError(f"a stack is already running from {state_dir} (run `down` first)")
        down(state_dir, quiet=True)  # a stale state file from a crash: clean what it names
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    names = ("ray_gcs", "ray_dashboard", "ray_agent", "ray_client", "moto", "mlflow")
    ports = dict(zip(names, free_ports(len(names))))
    # Ray's socket paths live under its temp dir and must stay under ~107 characters: keep it short
    ray_tmp = Path(tempfile.mkdtemp(prefix="fgray-", dir="/tmp"))
    # a fresh Ray auth token per stack, readable only by its owner (never ~/.ray/auth_token, which
    # other local clusters of the same user share)
    token_path = state_dir / "ray_auth_token"
    token_path.unlink(missing_ok=True)
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    state: dict[str, Any] = {
        "state_dir": str(state_dir),
        "ports": ports,
        "ray_temp_dir": str(ray_tmp),
        "ray_token_path": str(token_path),
        "started_at": time.time(),
        "services": {},
    }
    env = stack_env(state)
    base_env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
        # MLflow 3's background job runner (prompt optimisation, trace archival) spawns eight more
        # processes; the platform does not use it
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    # a local stack runs the user's own work: Ray's workers get the caller's priority instead of Ray's
    # default niceness 15 (see fractalgen/platform/ray_connect.py)
    base_env.setdefault("RAY_worker_niceness", str(os.nice(0)))
    # client settings that would point the services elsewhere are dropped; the stack sets its own
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        base_env.pop(key, None)
    svc_env = {**base_env, **{k: v for k, v in env.items() if k not in ("RAY_ADDRESS",)}}
    cpus = ray_cpus if ray_cpus is not None else max(1, os.cpu_count() or 1)
    commands = {
        "ray": [
            _bin("ray"), "start", "--head", "--block",
            f"--node-ip-address={HOST}", f"--port={ports['ray_gcs']}",
            f"--dashboard-host={HOST}", f"--dashboard-port={ports['ray_dashboard']}",
            f"--dashboard-agent-listen-port={ports['ray_agent']}",
            f"--ray-client-server-port={ports['ray_client']}",
            f"--temp-dir={ray_tmp}", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
            "--include-dashboard=true", "--disable-usage-stats",
        ],
        "moto": [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(ports["moto"])],
        "mlflow": [
            _bin("mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
            "--artifacts-destination", MLFLOW_ARTIFACTS,
            "--allowed-hosts", f"{HOST},{HOST}:*,localhost,localhost:*",
        ],
    }  # fmt: skip
    try:
        for service in SERVICES:
            log = logs / f"{service}.log"
            proc = _spawn(commands[service], log, svc_env, cwd=state_dir)
            state["services"][service] = {"pid": proc.pid, "pgid": proc.pid, "log": str(log)}
            write_state(state_dir, state)  # recorded at once: `down` can clean up even a failed start
        wait_healthy(state, SERVICES, timeout_s)
    except BaseException:
        down(state_dir, quiet=True)
        raise
    state["env"] = env
    write_state(state_dir, state)
    return state


# ----------------------------------------------------------------------------------------------------
# stop
# ----------------------------------------------------------------------------------------------------


def stack_processes(state: dict[str, Any]) -> list[psutil.Process]:
    """Every live process that belongs to the stack, found by the ids it recorded.

    A process belongs if it is a recorded leader, is in the process group or session a leader
    opened, descends from a leader, or names the stack's Ray temp dir on its command line (Ray
    workers a raylet started). Never matched by program name.
    """
    leaders = {int(info["pid"]) for info in state.get("services", {}).values() if info.get("pid")}
    groups = {
        int(info.get("pgid") or info["pid"]) for info in state.get("services", {}).values() if info.get("pid")
    }
    ray_tmp = state.get("ray_temp_dir") or None
    found: dict[int, psutil.Process] = {}
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        pid = proc.info["pid"]
        if pid == me:
            continue
        try:
            mine = pid in leaders or os.getpgid(pid) in groups or os.getsid(pid) in groups
            if not mine and ray_tmp:
                mine = any(ray_tmp in part for part in (proc.info["cmdline"] or ()))
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
        if mine:
            found[pid] = proc
    for pid in leaders:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                found.setdefault(child.pid, child)
    return [p for p in found.values() if _running(p)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def down(state_dir: Path, *, timeout_s: float = 20.0, quiet: bool = False) -> list[int]:
    """Stop the stack; return the PIDs still alive afterwards (empty when the stop was clean).

    Services stop in the order MLflow, Ray, moto (MLflow may still write artifacts to S3). Each gets
    SIGTERM (Ray's ``--block`` leader then stops its own processes), then SIGKILL after the wait.
    """
    state = read_state(state_dir)
    if state is None:
        if not quiet:
            print(f"no stack state in {state_dir}; nothing to stop")
        return []
    services = state.get("services", {})
    for service in ("mlflow", "ray", "moto"):
        info = services.get(service)
        if not info:
            continue
        sub = {**state, "services": {service: info}}
        if service != "ray":
            sub["ray_temp_dir"] = None
        procs = stack_processes(sub)
        if not procs:
            continue
        t0 = time.monotonic()
        # the leader first: Ray's `ray start --block` shuts its daemons down in order on SIGTERM
        with contextlib.suppress(psutil.Error):
            psutil.Process(int(info["pid"])).send_signal(signal.SIGTERM)
        _, rest = psutil.wait_procs(procs, timeout=timeout_s / 2)
        _signal_all([p for p in rest if _running(p)], signal.SIGTERM)
        _, rest = psutil.wait_procs(rest, timeout=timeout_s / 2)
        if rest:
            _signal_all(rest, signal.SIGKILL)
            psutil.wait_procs(rest, timeout=5)
        if not quiet:
            n = len(procs)
            print(f"stopped {service} ({n} process{'es' if n != 1 else ''}, {time.monotonic() - t0:.1f} s)")
    left = [p.pid for p in stack_processes(state)]
    if state.get("ray_temp_dir"):
        shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
    if not left:
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        (state_dir / "ray_auth_token").unlink(missing_ok=True)
    if not quiet:
        print("no process left" if not left else f"still running: {left}")
    return left


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def status(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Per service: pid, whether the process lives, whether it answers its health check."""
    state = read_state(state_dir)
    if state is None:
        return {s: {"pid": None, "alive": False, "healthy": False} for s in SERVICES}
    out = {}
    for service in SERVICES:
        info = state.get("services", {}).get(service, {})
        ok = alive(info.get("pid"))
        out[service] = {"pid": info.get("pid"), "alive": ok, "healthy": ok and health(service, state)}
    return out


def _print_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        print(f"export {key}={value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=None, help="default: $FRACTALGEN_STACK_DIR or /tmp")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start Ray head, moto S3 and MLflow; wait until healthy")
    p_up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for health (default 120)")
    p_up.add_argument("--ray-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    p_up.add_argument("--object-store-mb", type=int, default=256, help="Ray object store size (default 256)")
    sub.add_parser("status", help="health of each service (exit 1 unless all are healthy)").add_argument(
        "--json", action="store_true"
    )
    sub.add_parser("env", help='`export` lines for the stack\'s endpoints: eval "$(stack.sh env)"')
    p_down = sub.add_parser("down", help="stop every process of the stack")
    p_down.add_argument("--timeout", type=float, default=20.0, help="seconds before SIGKILL (default 20)")
    args = parser.parse_args(argv)
    state_dir = (args.state_dir or default_state_dir()).absolute()
    try:
        if args.cmd == "up":
            t0 = time.monotonic()
            state = up(
                state_dir,
                timeout_s=args.timeout,
                ray_cpus=args.ray_cpus,
                object_store_mb=args.object_store_mb,
            )
            print(f"stack up in {time.monotonic() - t0:.1f} s (state: {state_dir / STATE_FILE})")
            for service in SERVICES:
                info = state["services"][service]
                print(f"  {service:<7} healthy after {info['healthy_after_s']:>5.1f} s  pid {info['pid']}")
            _print_env(state["env"])
            return 0
        if args.cmd == "status":
            st = status(state_dir)
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                for service, row in st.items():
                    word = "healthy" if row["healthy"] else ("unhealthy" if row["alive"] else "down")
                    print(f"{service:<7} {word:<9} pid {row['pid']}")
            return 0 if all(row["healthy"] for row in st.values()) else 1
        if args.cmd == "env":
            state = read_state(state_dir)
            if state is None or "env" not in state:
                raise StackError(f"no running stack in {state_dir} (run `up`)")
            _print_env(state["env"])
            return 0
        if args.cmd == "down":
            return 1 if down(state_dir, timeout_s=args.timeout) else 0
    except StackError as err:
        print(f"stack {args.cmd}: error: {err}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
