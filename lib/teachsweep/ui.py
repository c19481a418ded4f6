"""`teachsweep ui`: the MLflow UI and optuna-dashboard on a sweep's stores, and the pages a researcher opens.

The servers are sized for a laptop (one MLflow worker, no MLflow job runner, optuna-dashboard's threaded
single-process server), started in their own process groups with their output in a temporary log, and the
URLs are printed only once each server answers. Any exit of `teachsweep ui` (normal, Ctrl-C, SIGTERM,
SIGHUP) stops every process they started.

The trials page opens on an MLflow saved view (an experiment tag `mlflow.sharedViewState.<id>` holding the
filter, the sort and the visible columns) named by the URL's `viewStateShareKey`: MLflow's URL state alone
carries the filter and the sort but not the columns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import quote, urlencode
from urllib.request import urlopen

from teachsweep.jobs import JOBS
from teachsweep.results import Sweep
from teachsweep.tracking import RetryingClient

HOST = "127.0.0.1"
DEFAULT_PORT = 5000  # MLflow's own default, so another `mlflow ui` often holds it already
PORT_SCAN = 100  # how far above the default to look for free ports
START_TIMEOUT_S = 600.0  # MLflow's first start on a loaded machine takes minutes
PROGRESS_EVERY_S = 15.0
STOP_GRACE_S = 10.0

VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow's saved and shared experiment-page views
MODEL_TRAINING = {"workflowType": "machine_learning"}  # without it MLflow 3 opens pages in its GenAI view


class PortInUse(Exception):
    """A port given with --port is taken, out of range or not ours to open: bad input."""


class ServerFailed(Exception):
    """A server died or never answered."""


class Stop(Exception):
    """A signal asked `teachsweep ui` to stop."""


# ---------------------------------------------------------------------------------------------- the views


def column(kind: str, key: str) -> str:
    """MLflow's canonical column id (`makeCanonicalSortKey`), as selectedColumns and orderByKey name columns."""
    return f"{kind}.`{key}`"


def trial_filter(sweep: Sweep) -> str:
    return f"tags.`teachsweep.sweep` = '{sweep.name}' and tags.`teachsweep.role` = 'trial'"


def searched_keys(sweep: Sweep) -> list[str]:
    """The config keys a sweep varies: its search space, or the keys its variants overlay."""
    keys = list(sweep.spec.space)
    for overlay in sweep.spec.variants.values():
        keys += [k for k in overlay if k not in keys]
    return keys


def trial_columns(sweep: Sweep, metrics: set[str], params: set[str], labels: set[str]) -> list[str]:
    """The objectives, the searched parameters and the job's held-out scores that the trials logged (MLflow
    flattens nested config keys with dots), and the arm label where trials carry different ones."""
    wanted = list(dict.fromkeys(sweep.spec.metric_names + JOBS[sweep.spec.job].scores))
    columns = [column("metrics", m) for m in wanted if m in metrics]
    for key in searched_keys(sweep):
        columns += [column("params", p) for p in sorted(params) if p == key or p.startswith(f"{key}.")]
    if len(labels) > 1:
        columns.append(column("tags", "teachsweep.label"))
    return columns


def logged_keys(sweep: Sweep, experiment_id: str) -> tuple[set[str], set[str], set[str]]:
    """Metric keys, param keys and arm labels of the sweep's trial runs."""
    runs = RetryingClient(sweep.tracking_uri).search_runs([experiment_id], trial_filter(sweep), max_results=5000)
    metrics = {k for r in runs for k in r.data.metrics}
    params = {k for r in runs for k in r.data.params}
    labels = {r.data.tags.get("teachsweep.label", "") for r in runs}
    return metrics, params, labels


# The runs table's leading columns by their grid ids: MLflow appends the columns an order leaves out, after it
LEADING_COLUMNS = [column("attributes", "Run Name"), "runDateAndNestInfo", "duration"]


def header_width(column_id: str) -> int:
    """Pixels for a header to show its whole name (MLflow's default of 100 cuts most metric names)."""
    name = column_id.split(".", 1)[1].strip("`")
    return max(100, min(6 * len(name) + 40, 260))


def trials_view_state(sweep: Sweep, experiment_id: str) -> dict[str, Any]:
    """The experiment page's search facets and UI state (the fields MLflow's shared views carry): the trials
    sorted by the first objective, and their columns visible, objectives first, wide enough for their names."""
    spec = sweep.spec
    columns = trial_columns(sweep, *logged_keys(sweep, experiment_id))
    return {
        "searchFilter": trial_filter(sweep),
        "orderByKey": column("metrics", spec.metric_names[0]),
        "orderByAsc": spec.mode_names[0] == "min",
        "selectedColumns": columns,
        "columnOrder": LEADING_COLUMNS + columns,
        "columnWidths": {c: header_width(c) for c in columns},
    }


def view_id(sweep: Sweep) -> str:
    return f"teachsweep.{sweep.name}"


def view_envelope(name: str, state: dict[str, Any], now_ms: int) -> str:
    """The tag value of an MLflow saved view: a named envelope whose `state` is the serialized view."""
    return json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})


def saved_state(value: str | None) -> dict[str, Any] | None:
    try:
        return json.loads(json.loads(value)["state"]) if value else None
    except (ValueError, KeyError, TypeError):
        return None


def save_trials_view(sweep: Sweep) -> bool:
    """Record the trials view on the sweep's experiment (again only when it changed); False when it cannot be
    written, and the trials URL then carries the filter and the sort without the columns."""
    from mlflow.exceptions import MlflowException  # heavy: the CLI loads MLflow only for the commands that use it

    client = RetryingClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.spec.experiment or sweep.spec.name)
    if experiment is None:
        return False
    key = VIEW_TAG_PREFIX + view_id(sweep)
    state = trials_view_state(sweep, experiment.experiment_id)
    if saved_state(experiment.tags.get(key)) == state:
        return True
    envelope = view_envelope(f"teachsweep: {sweep.name} trials", state, int(time.time() * 1000))
    try:
        client.set_experiment_tag(experiment.experiment_id, key, envelope)
    except (MlflowException, OSError):
        return False
    return True


def page_urls(sweep: Sweep, host: str = HOST, port: int = DEFAULT_PORT) -> dict[str, str]:
    """The trials (model-training view, flat, sorted by the first objective, with its columns when the saved
    view exists), the parent run's report, and the study on optuna-dashboard (port + 1)."""
    import optuna  # heavy: only the study's page number needs it

    spec = sweep.spec
    experiment = RetryingClient(sweep.tracking_uri).get_experiment_by_name(spec.experiment or spec.name)
    base = f"http://{host}:{port}/#/experiments/{experiment.experiment_id if experiment else ''}"
    if experiment is not None and VIEW_TAG_PREFIX + view_id(sweep) in experiment.tags:
        # MLflow applies a saved view only while the URL carries no filter or sort of its own
        state = {"viewStateShareKey": view_id(sweep), "compareRunsMode": "TABLE"}
    else:
        state = {
            "searchFilter": trial_filter(sweep),
            "orderByKey": column("metrics", spec.metric_names[0]),
            "orderByAsc": "true" if spec.mode_names[0] == "min" else "false",
        }
    urls = {"trials": f"{base}/runs?{urlencode(MODEL_TRAINING | state, quote_via=quote)}"}
    if sweep.parent_run_id:
        urls["report"] = f"{base}/runs/{sweep.parent_run_id}/artifacts/report.html?{urlencode(MODEL_TRAINING)}"
    if spec.space and sweep.layout.optuna_file.exists():
        try:
            study = optuna.storages.RDBStorage(sweep.optuna_url).get_study_id_from_name(spec.name)
            urls["study"] = f"http://{host}:{port + 1}/dashboard/studies/{study}"
        except KeyError:
            pass
    return urls


# ---------------------------------------------------------------------------------------------- ports


def port_in_use(host: str, port: int) -> bool:
    return port_problem(host, port) is not None


def port_problem(host: str, port: int) -> str | None:
    """Why `port` cannot be served on `host` ("in use", "out of range", the OS's reason), or None."""
    if not 0 < port < 65536:
        return "out of range (1-65535)"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except PermissionError as error:  # below 1024 without the privilege to open it
            return f"not allowed ({error.strerror})"
        except OSError:
            return "in use"
    return None


def choose_port(host: str, requested: int | None, count: int) -> tuple[int, str | None]:
    """The first of `count` consecutive free ports: the requested ones or fail; by default DEFAULT_PORT or the
    next free run of ports above it, with a note saying why."""
    if requested is not None:
        for port in range(requested, requested + count):
            if problem := port_problem(host, port):
                both = f" (the MLflow UI takes {requested}, optuna-dashboard {port})" if port > requested else ""
                raise PortInUse(f"port {port} on {host}: {problem}{both}; give another with --port")
        return requested, None
    for base in range(DEFAULT_PORT, DEFAULT_PORT + PORT_SCAN):
        busy = [p for p in range(base, base + count) if port_in_use(host, p)]
        if not busy:
            return base, None if base == DEFAULT_PORT else f"port {DEFAULT_PORT} is in use; using port {base}"
    raise PortInUse(f"no {count} free consecutive ports on {host} in {DEFAULT_PORT}-{DEFAULT_PORT + PORT_SCAN}")


# ---------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    label: str
    command: list[str]
    port: int
    health_url: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log: Path | None = None


def executable(name: str) -> str | None:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def mlflow_server(sweep: Sweep, port: int) -> Server:
    command = [
        executable("mlflow") or "mlflow",
        "ui",
        "--backend-store-uri",
        sweep.tracking_uri,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # The job runner (huey consumers) only serves GenAI evaluation jobs: seven processes and about 1 GiB
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return Server("MLflow UI", command, port, f"http://{HOST}:{port}/health", env)


def dashboard_server(sweep: Sweep, dashboard: str, port: int, page: str | None) -> Server:
    command = [dashboard, sweep.optuna_url, "--host", HOST, "--port", str(port), "--server", "wsgiref"]
    return Server("optuna-dashboard", command, port, page or f"http://{HOST}:{port}/dashboard/")


def start(server: Server, log_dir: Path) -> None:
    server.log = log_dir / f"{server.label.replace(' ', '-')}.log"
    with server.log.open("wb") as out:
        server.process = subprocess.Popen(
            server.command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | server.env,
            start_new_session=True,  # its own process group, so stopping it reaches its workers too
        )


def answers(url: str) -> bool:
    try:
        with urlopen(url, timeout=5) as response:
            return response.status == 200
    except (URLError, HTTPException, OSError):
        return False


def last_lines(log: Path | None, count: int = 3) -> str:
    lines = [line.strip() for line in (log.read_text(errors="replace") if log and log.exists() else "").splitlines()]
    lines = [line for line in lines if line]
    return " | ".join(lines[-count:]) if lines else "no output"


def wait_until_ready(servers: list[Server], say: Callable[[str], None], timeout: float = START_TIMEOUT_S) -> None:
    start_time, next_note = time.monotonic(), PROGRESS_EVERY_S
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            code = server.process.poll() if server.process else None
            if code is not None:
                raise ServerFailed(f"{server.label} exited ({code}) while starting: {last_lines(server.log)}")
            if answers(server.health_url):
                say(f"{server.label} is up on port {server.port} ({time.monotonic() - start_time:.0f} s)")
                waiting.remove(server)
        elapsed = time.monotonic() - start_time
        if waiting and elapsed > timeout:
            names = ", ".join(f"{s.label} ({last_lines(s.log)})" for s in waiting)
            raise ServerFailed(f"no answer within {timeout:.0f} s from {names}")
        if waiting and elapsed > next_note:
            say(f"still starting {', '.join(s.label for s in waiting)} ({elapsed:.0f} s)...")
            next_note += PROGRESS_EVERY_S
        if waiting:
            time.sleep(0.5)


def signal_group(server: Server, sig: signal.Signals) -> bool:
    """Send `sig` to the server's process group; False when nothing of it is left."""
    if server.process is None:
        return False
    server.process.poll()  # reap the leader, so a finished group is not kept alive by its zombie
    try:
        os.killpg(server.process.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop(servers: list[Server]) -> None:
    running = [s for s in servers if signal_group(s, signal.SIGTERM)]
    deadline = time.monotonic() + STOP_GRACE_S
    while running and time.monotonic() < deadline:
        time.sleep(0.2)
        running = [s for s in running if signal_group(s, 0)]
    for server in running:
        signal_group(server, signal.SIGKILL)
    for server in servers:
        if server.process is not None:
            try:
                server.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass


def watch(servers: list[Server]) -> None:
    """Block until a server exits (then fail) or a signal stops `teachsweep ui`."""
    while True:
        for server in servers:
            code = server.process.poll() if server.process else None
            if code is not None:
                raise ServerFailed(f"{server.label} stopped ({code}): {last_lines(server.log)}")
        time.sleep(1.0)


def raise_stop(signum: int, _frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def planned_servers(sweep: Sweep, port: int, urls: dict[str, str], say: Callable[[str], None]) -> list[Server]:
    servers = [mlflow_server(sweep, port)]
    if sweep.spec.space:
        dashboard = executable("optuna-dashboard")
        if not sweep.layout.optuna_file.exists():  # optuna-dashboard would create an empty one
            say("no Optuna study was kept for this sweep: starting the MLflow UI only")
        elif dashboard:
            servers.append(dashboard_server(sweep, dashboard, port + 1, urls.get("study")))
        else:
            say("optuna-dashboard is not installed: starting the MLflow UI only")
    return servers


def serve(sweep: Sweep, requested_port: int | None, say: Callable[[str], None]) -> None:
    """Start the servers, wait for them to answer, print the pages and serve until stopped.

    Raises PortInUse before anything starts, ServerFailed when a server dies; returns on a stop signal."""
    dashboard = sweep.spec.space and sweep.layout.optuna_file.exists()
    port, note = choose_port(HOST, requested_port, 2 if dashboard else 1)
    if note:
        say(note)
    save_trials_view(sweep)
    urls = page_urls(sweep, port=port)
    servers = planned_servers(sweep, port, urls, say)
    if len(servers) == 1:  # no dashboard started: its page would show nothing, or another server
        urls.pop("study", None)
    log_dir = Path(tempfile.mkdtemp(prefix="teachsweep-ui-"))  # never in the results: reading only reads
    previous = {sig: signal.signal(sig, raise_stop) for sig in STOP_SIGNALS}
    try:
        for server in servers:
            say(f"starting {server.label} on port {server.port}...")
            start(server, log_dir)
        wait_until_ready(servers, say)
        for page, url in urls.items():
            say(f"{page + ':':8} {url}")
        say(f"Ctrl-C stops {'both' if len(servers) > 1 else 'it'}.")
        watch(servers)
    except Stop:
        pass
    finally:
        for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the stopping short
            signal.signal(sig, signal.SIG_IGN)
        stop(servers)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(log_dir, ignore_errors=True)
