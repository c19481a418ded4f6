"""The cluster/ manifests parse, and carry the fields the README relies on."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).parents[1] / "cluster"


def load_all(name):
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def test_raycluster_head_schedules_only_and_workers_have_gpus_and_shared_storage():
    (cluster,) = load_all("k8s/raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and cluster["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_env = {e["name"] for e in head["template"]["spec"]["containers"][0]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"} <= head_env
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert gpu["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "teachsweep-shared"


def test_rayjob_runs_a_sweep_and_shuts_down():
    (job,) = load_all("k8s/rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["entrypoint"].startswith("python -m teachsweep.cli run sweeps/")
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "MLFLOW_TRACKING_URI" in runtime["env_vars"]
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert (Path(__file__).parents[1] / job["spec"]["entrypoint"].split()[-1]).is_file()


def test_mlflow_server_uses_postgres_and_an_artifact_store_and_is_not_public():
    deployment, service = load_all("k8s/mlflow.yaml")
    args = " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--backend-store-uri" in args and "--artifacts-destination s3://" in args and "--allowed-hosts" in args
    assert service["spec"]["type"] == "ClusterIP"
    compose = load_all("mlflow/docker-compose.yaml")[0]
    assert "postgres" in compose["services"] and "postgresql://" in compose["services"]["mlflow"]["command"]
    assert all(port.startswith("${MLFLOW_BIND:-127.0.0.1}") for port in compose["services"]["mlflow"]["ports"])


def test_launcher_runtime_env_and_submit_script():
    launcher = load_all("cluster-launcher.yaml")[0]
    assert launcher["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("scripts/setup.sh" in c for c in launcher["setup_commands"])
    runtime = load_all("runtime_env.yaml")[0]
    assert runtime["working_dir"] == "." and ".venv" in runtime["excludes"]
    script = (CLUSTER / "submit.sh").read_text()
    assert 'ray" job submit' in script or "job submit" in script
    assert (CLUSTER / "submit.sh").stat().st_mode & 0o111


@pytest.mark.parametrize("tracking", [None, "http://mlflow.example:5000"])
def test_submit_sends_the_tracking_uri_only_when_it_is_set(tmp_path, tracking):
    """An unset MLFLOW_TRACKING_URI must not reach the cluster as an empty value (it would override the nodes')."""
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TEACHSWEEP_SUBMIT_DRY_RUN": "1"}
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
    out = subprocess.run([str(CLUSTER / "submit.sh"), str(spec), "http://head:8265"], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()  # fmt: skip
    runtime_env = json.loads(out[out.index("--runtime-env-json") + 1])
    assert out[out.index("--address") + 1] == "http://head:8265" and out[-1] == str(spec)
    if tracking:
        assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == tracking
    else:
        assert "MLFLOW_TRACKING_URI" not in runtime_env["env_vars"]
