"""`teachsweep ui` on a real two-trial sweep, with the real MLflow UI and optuna-dashboard: ports, start-up,
stopping, and the view the trials page opens on."""

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing, suppress
from pathlib import Path
from urllib.request import urlopen

import psutil
import pytest
from mlflow.tracking import MlflowClient
from small_jobs import lot_search_spec

from teachsweep import ui
from teachsweep.report import STYLE
from teachsweep.results import open_sweep
from teachsweep.spec import parse_spec
from teachsweep.sweep import run_sweep

pytestmark = pytest.mark.integration

CONFIG = '{task: digits, teacher: "cnn:8", epochs: 1, steps_per_epoch: 2, max_eval_examples: 32, batch_size: 16}'
START_S = 600  # MLflow's first start on a loaded machine takes minutes


@pytest.fixture(scope="module")
def results(ray_session, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("ui") / "results"
    text = lot_search_spec("uisweep", CONFIG, 2, 2, results, lowest_alpha=0.05)
    run_sweep(parse_spec(text), text)
    return results


def listening(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def free_pair() -> int:
    """A port p with p and p + 1 free (the MLflow UI and optuna-dashboard)."""
    for _ in range(50):
        with closing(socket.socket()) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65535 and not ui.port_in_use("127.0.0.1", port) and not ui.port_in_use("127.0.0.1", port + 1):
            return port
    raise AssertionError("no two consecutive free ports")


def teachsweep_ui(results: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "teachsweep.cli", "ui", "uisweep", "--results-dir", str(results), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )


def lines_of(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def read_until(lines: queue.Queue, prefix: str, seen: list[str]) -> str:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        line = lines.get(timeout=deadline - time.monotonic())
        assert line is not None, f"teachsweep ui ended before printing {prefix!r}: {seen}"
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} line within {START_S} s: {seen}")


def status_of(url: str) -> int:
    with urlopen(url, timeout=10) as response:
        return response.status


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    living = []
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                living.append(process)
    return living


def end(process: subprocess.Popen, children: list[psutil.Process]) -> None:
    """Leave nothing behind, whatever the test found."""
    if process.poll() is None:
        process.kill()
        process.wait()
    for child in alive(children):
        child.kill()


def test_a_busy_default_port_gets_the_next_free_one_urls_follow_the_servers_and_sigterm_stops_every_child(
    results,
):
    held = None if ui.port_in_use("127.0.0.1", ui.DEFAULT_PORT) else listening(ui.DEFAULT_PORT)
    process, children, seen = teachsweep_ui(results), [], []
    try:
        lines = lines_of(process)
        note = read_until(lines, f"port {ui.DEFAULT_PORT} is in use", seen)
        port = int(re.search(r"using port (\d+)", note).group(1))
        assert port != ui.DEFAULT_PORT
        trials = read_until(lines, "trials:", seen)
        # right after the URLs appear, both servers answer, on the ports they name
        assert status_of(f"http://127.0.0.1:{port}/health") == 200
        study = read_until(lines, "study:", seen).split()[1]
        assert study.startswith(f"http://127.0.0.1:{port + 1}/") and status_of(study) == 200
        assert trials.split()[1].startswith(f"http://127.0.0.1:{port}/#/experiments/")
        assert f"starting MLflow UI on port {port}..." in seen[: seen.index(trials)]
        assert f"starting optuna-dashboard on port {port + 1}..." in seen[: seen.index(trials)]

        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) <= 4, [c.cmdline() for c in children]  # sized for a laptop: no worker pools
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        assert alive(children) == [], [c.cmdline() for c in alive(children)]
    finally:
        end(process, children)
        if held:
            held.close()
    assert not list(results.rglob("*.log"))  # the servers' output went to a temporary log, not the results


def test_an_explicitly_requested_busy_port_fails_with_one_line_and_exit_2(results):
    port = free_pair()
    with closing(listening(port + 1)):
        process = teachsweep_ui(results, "--port", str(port))
        try:
            output, _ = process.communicate(timeout=120)
        finally:
            end(process, [])
    assert process.returncode == 2
    assert output.strip().splitlines() == [
        f"error: port {port + 1} on 127.0.0.1: in use (the MLflow UI takes {port}, optuna-dashboard {port + 1}); "
        "give another with --port"
    ]


def test_a_requested_port_out_of_range_or_not_ours_is_bad_input_not_a_crash():
    with pytest.raises(
        ui.PortInUse,
        match=r"^port 65536 on 127.0.0.1: out of range \(1-65535\) \(the MLflow UI takes 65535, optuna-dashboard 65536\)",
    ):
        ui.choose_port("127.0.0.1", 65535, 2)  # optuna-dashboard would get 65536 (bind() raised OverflowError)
    with pytest.raises(ui.PortInUse, match="port 0 on 127.0.0.1: out of range"):
        ui.choose_port("127.0.0.1", 0, 1)
    if os.geteuid() != 0:  # only root may open ports below 1024
        with pytest.raises(ui.PortInUse, match=r"port 80 on 127.0.0.1: not allowed \(Permission denied\)"):
            ui.choose_port("127.0.0.1", 80, 1)


def test_a_sweep_whose_study_file_is_gone_opens_mlflow_only_and_creates_no_study(results, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(results, moved)
    (moved / "uisweep" / "optuna.db").unlink()
    said: list[str] = []
    servers = ui.planned_servers(open_sweep("uisweep", moved), free_pair(), {}, said.append)
    assert [server.label for server in servers] == ["MLflow UI"]
    assert said == ["no Optuna study was kept for this sweep: starting the MLflow UI only"]
    assert not (moved / "uisweep" / "optuna.db").exists()


def test_a_server_that_dies_while_starting_is_reported_with_its_last_lines(tmp_path):
    script = "import sys; print('loading'); print('[Errno 98] address already in use'); sys.exit(3)"
    server = ui.Server("MLflow UI", [sys.executable, "-c", script], 1, "http://127.0.0.1:1/health")
    ui.start(server, tmp_path)
    with pytest.raises(ui.ServerFailed) as failure:
        ui.wait_until_ready([server], lambda line: None, timeout=60)
    assert str(failure.value) == "MLflow UI exited (3) while starting: loading | [Errno 98] address already in use"


def test_the_trials_view_shows_the_objective_the_searched_parameters_and_the_held_out_scores(results):
    sweep = open_sweep("uisweep", results)
    assert ui.save_trials_view(sweep)
    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name("uisweep")
    envelope = json.loads(experiment.tags["mlflow.sharedViewState.teachsweep.uisweep"])
    state = json.loads(envelope["state"])
    metrics = [
        "teacher/best_val_acc",
        "teacher/test_acc",
        "teacher/test_acc_at_best_val",
        "student/test_acc",
        "steps/teacher_at_best_val",
        "steps/model_at_best_val",
    ]
    columns = [f"metrics.`{m}`" for m in metrics] + ["params.`alpha`", "params.`student_steps`"]
    assert state["selectedColumns"] == columns  # the scores the job logged; it logs no perplexity on digits
    assert state["columnOrder"] == ["attributes.`Run Name`", "runDateAndNestInfo", "duration", *columns]
    assert state["orderByKey"] == "metrics.`teacher/best_val_acc`" and state["orderByAsc"] is False
    assert state["searchFilter"] == "tags.`teachsweep.sweep` = 'uisweep' and tags.`teachsweep.role` = 'trial'"
    assert ui.save_trials_view(sweep)  # saving it again changes nothing
    assert client.get_experiment_by_name("uisweep").tags == experiment.tags

    urls = ui.page_urls(sweep, port=5123)
    # the saved view carries filter, sort and columns: MLflow ignores it when the URL has a filter of its own
    assert urls["trials"] == (
        f"http://127.0.0.1:5123/#/experiments/{experiment.experiment_id}/runs?"
        "workflowType=machine_learning&viewStateShareKey=teachsweep.uisweep"
        "&compareRunsMode=TABLE"
    )
    assert urls["report"].endswith(f"/runs/{sweep.parent_run_id}/artifacts/report.html?workflowType=machine_learning")


def test_report_figures_scale_to_the_page(results):
    rule = re.search(r"figure img\{([^}]*)\}", STYLE).group(1)
    assert "max-width:100%" in rule and "height:auto" in rule
    page = (results / "uisweep" / "report.html").read_text()
    assert "figure img{" in page and "<img" in page
