"""A real Ray head started with `ray start` on loopback from an environment that has teachsweep's dependencies but
not teachsweep, a real `mlflow server` (SQLite backend, loopback port), and a 2-trial sweep submitted with
`cluster/submit.sh`: the job installs the project from its shipped working dir (cluster/runtime_env.yaml), and the
runs arrive through the HTTP tracking server."""

import os
import secrets
import subprocess
from pathlib import Path

import local_servers as servers
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_sweep_submitted_as_a_ray_job_installs_itself_and_logs_through_an_mlflow_server(tmp_path):
    # Token authentication, as on a real cluster: the head and `ray job submit` share RAY_AUTH_TOKEN.
    env = servers.token_auth_env(os.environ) | {"RAY_ADDRESS": ""}
    mlflow_port, gcs_port, dashboard_port = servers.free_port(), servers.free_port(), servers.free_port()
    tracking, dashboard = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{dashboard_port}"
    python = servers.environment_without_teachsweep(tmp_path / "env")
    missing = subprocess.run([str(python), "-c", "import teachsweep"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode != 0 and "No module named 'teachsweep'" in missing.stderr, missing.stderr
    # started after the check above: a server started before it would outlive a failure there
    server = servers.start_mlflow_server(mlflow_port, env, *servers.sqlite_store(tmp_path))
    head = servers.start_ray_head(python, env, gcs_port, dashboard_port, 2, 20000)
    # Specs are shipped with the repository: this one lives in it for the test's duration.
    spec = ROOT / "tests" / f"_submitted_{secrets.token_hex(4)}.yaml"
    try:
        servers.wait_for(f"{tracking}/health", 120)
        servers.wait_for(f"{dashboard}/api/version", 120)
        spec.write_text("""
name: submitted
job: lot
config: {task: digits, teacher: "cnn:8", epochs: 2, steps_per_epoch: 3, max_eval_examples: 32}
space: {alpha: {type: loguniform, low: 0.1, high: 1.0}}
num_samples: 2
max_concurrent_trials: 2
""")
        submit_env = env | {"RAY_BIN": str(servers.BIN / "ray"), "MLFLOW_TRACKING_URI": tracking}
        submit = servers.submit_once_an_agent_answers(ROOT, str(spec), dashboard, tmp_path / "results", submit_env, 600)
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
