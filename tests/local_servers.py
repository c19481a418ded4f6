"""Servers on loopback for the cluster tests: Ray nodes started with `ray start` and an `mlflow server`, each in its
own process group, from an environment that cannot import teachsweep; free ports, Ray's token authentication and
sweeps submitted with `cluster/submit.sh`."""

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent
SMALL_OBJECT_STORE = ("--object-store-memory", str(200 * 2**20))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401: Ray's token authentication is on; `ray job submit` sends the token)
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def environment_without_teachsweep(where: Path) -> Path:
    """A virtual environment that sees this one's packages (a .pth line: their directory on sys.path, whose own .pth
    files, teachsweep's editable hook among them, are not processed) but cannot import teachsweep; its python."""
    import site

    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    own_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(own_site) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def token_auth_env(base: Mapping[str, str]) -> dict[str, str]:
    """`base` with token authentication on, as on a real cluster: every node, driver and `ray job submit` started
    with it shares one RAY_AUTH_TOKEN; this environment's commands (ray, mlflow) come first on PATH."""
    return dict(base) | {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }


def start_detached(command: list[str], env: Mapping[str, str], log: IO | None = None) -> subprocess.Popen:
    """`command` in a process group of its own (os.killpg stops it with its children), its output in `log` or
    nowhere."""
    return subprocess.Popen(
        command,
        env=env,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        start_new_session=True,
    )


def start_ray_node(python: Path, env: Mapping[str, str], *options: str, log: IO | None = None) -> subprocess.Popen:
    """`ray start --block` on 127.0.0.1: the node lives exactly as long as this process, so stopping it stops only
    this node. Every agent gets a free port of its own, so that other Ray instances on the machine (the test
    session's, other nodes) don't clash."""
    return start_detached(
        [
            str(python),
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            *options,
        ],
        env,
        log,
    )


def worker_ports(low: int) -> tuple[str, ...]:
    """The 1,000 ports from `low` for a node's worker processes: distinct per node, as on separate machines."""
    return ("--min-worker-port", str(low), "--max-worker-port", str(low + 999))


def own_temp_dir(prefix: str) -> tuple[str, ...]:
    """A node's own --temp-dir, as on its own machine: nodes sharing one would share the runtime env agent's
    unpacked packages too (runtime_resources/), and one node's clean-up would reach the others'. Short, under /tmp:
    Unix socket paths are limited."""
    return ("--temp-dir", tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def start_ray_head(
    python: Path,
    env: Mapping[str, str],
    gcs_port: int,
    dashboard_port: int,
    cpus: int,
    low_worker_port: int,
    *options: str,
) -> subprocess.Popen:
    """A head node with its GCS and dashboard (the job server) on the given ports and `cpus` CPUs for trials."""
    return start_ray_node(
        python,
        env,
        "--head",
        "--port",
        str(gcs_port),
        "--num-cpus",
        str(cpus),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        *worker_ports(low_worker_port),
        *own_temp_dir("rc"),
        *options,
    )


def start_ray_worker(
    python: Path, env: Mapping[str, str], gcs: str, cpus: int, low_worker_port: int, log: IO | None = None
) -> subprocess.Popen:
    """A worker node joining the head at `gcs`: its own raylet, object manager and agents on their own ports."""
    return start_ray_node(
        python,
        env,
        "--address",
        gcs,
        "--num-cpus",
        str(cpus),
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
        *worker_ports(low_worker_port),
        *own_temp_dir("rw"),
        *SMALL_OBJECT_STORE,
        log=log,
    )


def cluster_cpus(gcs: str, env: Mapping[str, str]) -> float:
    """The CPUs of the live nodes of the cluster at `gcs` (0 while it does not answer)."""
    code = (
        f"import ray; ray.init(address='{gcs}', logging_level='ERROR', log_to_driver=False); "
        "print(ray.cluster_resources().get('CPU', 0))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return float(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.split() else 0.0


def start_mlflow_server(port: int, env: Mapping[str, str], *store: str, workers: int = 1) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port`; `store` names its backend and artifact options."""
    return start_detached(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), *store, "--workers", str(workers)],
        env,
    )


def sqlite_store(where: Path) -> tuple[str, ...]:
    """An MLflow server's options for a SQLite backend and an artifact root, both in `where`."""
    return ("--backend-store-uri", f"sqlite:///{where / 'server.db'}", "--default-artifact-root", str(where / "art"))


def submit_command(repo: Path, spec: str, dashboard: str, results: Path) -> list[str]:
    """`cluster/submit.sh` of `repo`: the sweep `spec` as a Ray job on the cluster whose dashboard is `dashboard`."""
    return [str(repo / "cluster" / "submit.sh"), "--results-dir", str(results), spec, dashboard]


def submit_once_an_agent_answers(
    repo: Path, spec: str, dashboard: str, results: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """`submit_command` run to its end from `repo`, again while the head has no job agent yet."""
    for _ in range(12):  # the head's job agent can take a while to come up on a loaded machine
        done = subprocess.run(
            submit_command(repo, spec, dashboard, results),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=repo,
        )
        if "No available agent" not in done.stderr + done.stdout:
            break
        time.sleep(10)
    return done
