"""A real Ray head started with `ray start` on loopback from an environment that has teachsweep's dependencies but
not teachsweep, a real `mlflow server` (SQLite backend, loopback port), and a 2-trial sweep submitted with
`cluster/submit.sh`: the job installs the project from its shipped working dir (cluster/runtime_env.yaml), and the
runs arrive through the HTTP tracking server."""

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
ROOT = Path(__file__).parents[1]


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


@pytest.mark.slow
def test_sweep_submitted_as_a_ray_job_installs_itself_and_logs_through_an_mlflow_server(tmp_path):
    # Token authentication, as on a real cluster: the head and `ray job submit` share RAY_AUTH_TOKEN.
    env = os.environ | {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": "",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    mlflow_port, gcs_port, dashboard_port = free_port(), free_port(), free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            str(tmp_path / "art"),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # --block: the head lives exactly as long as this process, so stopping it stops only this cluster
    python = environment_without_teachsweep(tmp_path / "env")
    missing = subprocess.run([str(python), "-c", "import teachsweep"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode != 0 and "No module named 'teachsweep'" in missing.stderr, missing.stderr
    head = subprocess.Popen(
        [
            str(python),
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--num-cpus",
            "2",
            "--temp-dir",
            tempfile.mkdtemp(prefix="ray", dir="/tmp"),  # short: Unix socket paths are limited
            # own ports for every agent, so that other Ray instances on the machine (the test session's) don't clash
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            "--min-worker-port",
            "20000",
            "--max-worker-port",
            "20999",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Specs are shipped with the repository: this one lives in it for the test's duration.
    spec = ROOT / "tests" / f"_submitted_{secrets.token_hex(4)}.yaml"
    try:
        wait_for(f"{tracking}/health", 120)
        wait_for(f"http://127.0.0.1:{dashboard_port}/api/version", 120)
        spec.write_text("""
name: submitted
job: lot
config: {task: digits, teacher: "cnn:8", epochs: 2, steps_per_epoch: 3, max_eval_examples: 32}
space: {alpha: {type: loguniform, low: 0.1, high: 1.0}}
num_samples: 2
max_concurrent_trials: 2
""")
        for _ in range(12):  # the head's job agent can take a while to come up on a loaded machine
            submit = subprocess.run(
                [
                    str(ROOT / "cluster" / "submit.sh"),
                    "--results-dir",
                    str(tmp_path / "results"),
                    str(spec),
                    f"http://127.0.0.1:{dashboard_port}",
                ],
                env=env | {"RAY_BIN": str(BIN / "ray"), "MLFLOW_TRACKING_URI": tracking},
                capture_output=True,
                text=True,
                timeout=600,
                cwd=ROOT,
            )
            if "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(10)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name("submitted")
        runs = client.search_runs([experiment.experiment_id], "tags.`teachsweep.role` = 'trial'")
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
        assert all(len(client.get_metric_history(r.info.run_id, "teacher/val_acc")) == 2 for r in runs)
        assert not (tmp_path / "results" / "mlflow.db").exists()  # nothing bypassed the server
    finally:
        spec.unlink(missing_ok=True)
        for process in (head, server):
            os.killpg(process.pid, 15)
        for process in (head, server):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
