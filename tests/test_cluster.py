"""The cluster/ manifests parse, and carry the fields the README relies on."""

from pathlib import Path

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
