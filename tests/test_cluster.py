"""The cluster/ templates: they validate against the schemas of the tools that read them (KubeRay's CRDs, vendored in
cluster/schemas/, and the launcher schema of the installed Ray), and carry what a real cluster needs: token auth
through KubeRay's authOptions, results and teachers on the shared volume, an autoscaling launcher that runs Ray
from the project's virtualenv, and an MLflow server that starts and answers on the URLs the README gives."""

import copy
import fnmatch
import functools
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY_SCHEMAS = CLUSTER / "schemas" / "kuberay-v1.7.0"
# KubeRay reads the token from this key of authOptions.secretName (RAY_AUTH_TOKEN_SECRET_KEY in
# ray-operator/controllers/ray/utils/constant.go); token mode needs Ray >= 2.52.0 (utils/validation.go).
KUBERAY_TOKEN_KEY = "auth_token"
TOKEN_SECRET = "teachsweep-ray-token"
VENV_RAY = "~/teachsweep/.venv/bin/ray"  # scripts/setup.sh run in ~/teachsweep creates ~/teachsweep/.venv


def load_all(name):
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def pod_templates(cluster_spec):
    """(group name, pod spec) of the head and of every worker group of a RayCluster spec."""
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def cluster_specs():
    (cluster,) = load_all("k8s/raycluster.yaml")
    (job,) = load_all("k8s/rayjob.yaml")
    return {"raycluster": cluster["spec"], "rayjob": job["spec"]["rayClusterSpec"]}


def compose_defaults(text: str) -> str:
    """Docker Compose interpolation with nothing set in the environment: ${NAME:-default} -> default."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)


def host_header(url: str) -> str:
    """The Host header an HTTP client sends for URL (http.client: the port unless it is the scheme's default)."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}[parts.scheme]
    return parts.hostname if parts.port in (None, default) else f"{parts.hostname}:{parts.port}"


# ---------------------------------------------------------------------------------------------- CRD validation


def closed(schema):
    """A copy of a CRD schema in which an object that declares `properties` accepts no other field, as the API
    server behaves (it prunes undeclared fields, `kubectl apply` refuses them): JSON Schema would let them pass."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if not isinstance(node, dict):
            return
        if "properties" in node and "additionalProperties" not in node:
            if not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            visit(child)
        for key in ("items", "additionalProperties", "not"):
            visit(node.get(key))
        for key in ("anyOf", "allOf", "oneOf"):
            for child in node.get(key, []):
                visit(child)

    visit(schema)
    return schema


def list_type(validator, value, instance, schema):
    """x-kubernetes-list-type: `map` lists have unique x-kubernetes-list-map-keys, `set` lists unique items."""
    if not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", []) if value == "map" else None
    seen = set()
    for item in instance:
        if value == "map":
            key = tuple(json.dumps(item.get(k)) for k in keys) if isinstance(item, dict) else None
        elif value == "set":
            key = json.dumps(item, sort_keys=True)
        else:  # atomic: only how server-side apply merges
            return
        if key is not None and key in seen:
            yield jsonschema.ValidationError(f"duplicate entry in a list-type {value} list: {item!r}")
        seen.add(key)


KubernetesValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": list_type})


@functools.cache
def crd_validator(kind: str):
    schema = json.loads((KUBERAY_SCHEMAS / f"{kind.lower()}s.ray.io.v1.json").read_text())
    return KubernetesValidator(closed(schema))


def crd_errors(manifest) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator(manifest["kind"]).iter_errors(manifest)
    ]


@pytest.mark.parametrize("name", ["k8s/raycluster.yaml", "k8s/rayjob.yaml"])
def test_kuberay_manifests_validate_against_the_vendored_crd_schemas(name):
    (manifest,) = load_all(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert crd_errors(manifest) == []


def test_the_crd_validator_refuses_what_the_api_server_would():
    (job,) = load_all("k8s/rayjob.yaml")
    head = lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]  # noqa: E731
    cases = {
        "misspelled field": lambda m: m["spec"]["rayClusterSpec"].update(authOption={"mode": "token"}),
        "field in the wrong place": lambda m: m["spec"].update(authOptions={"mode": "token"}),
        "value outside an enum": lambda m: m["spec"]["rayClusterSpec"]["authOptions"].update(mode="Token"),
        "a duplicate env name": lambda m: head(m)["env"].append(dict(head(m)["env"][0])),
        "a float quantity": lambda m: head(m)["resources"]["requests"].update(cpu=1.5),
        "a bad quantity": lambda m: head(m)["resources"]["requests"].update(memory="8 GB"),
    }
    for what, change in cases.items():
        broken = copy.deepcopy(job)
        change(broken)
        assert crd_errors(broken), what
    fine = copy.deepcopy(job)
    head(fine)["resources"]["requests"].update(cpu=2, memory="8Gi")  # int-or-string: both kinds pass
    assert crd_errors(fine) == []


# ---------------------------------------------------------------------------------------------- KubeRay: auth


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_token_auth_goes_through_kuberay_auth_options(which):
    """Only authOptions reaches the operator's dashboard client, the RayJob submission and the autoscaler sidecar;
    a RAY_AUTH_* variable set by hand would stop the operator from injecting its own."""
    spec = cluster_specs()[which]
    assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
    for group, pod in pod_templates(spec):
        for container in pod["containers"] + pod.get("initContainers", []):
            env = env_of(container)
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env), (group, container["name"])
            for source in env.values():
                ref = source.get("secretKeyRef", {}) if isinstance(source, dict) else {}
                assert ref.get("name") != TOKEN_SECRET or ref.get("key") == KUBERAY_TOKEN_KEY


def test_the_documented_token_secret_has_the_key_kuberay_reads():
    docs = [CLUSTER / "k8s/raycluster.yaml", CLUSTER / "TEMPLATES_NOTES.md", CLUSTER / "README.md"]
    text = "\n".join(path.read_text() for path in docs if path.exists())
    commands = [rest for name, rest in re.findall(r"create secret generic (\S+)(.*)", text) if name == TOKEN_SECRET]
    assert commands and all(f"--from-literal={KUBERAY_TOKEN_KEY}=" in rest for rest in commands)


# ---------------------------------------------------------------------------------------------- KubeRay: pods


def test_raycluster_head_schedules_only_and_workers_have_gpus_and_shared_storage():
    spec = cluster_specs()["raycluster"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert {"MLFLOW_TRACKING_URI", "TEACHSWEEP_CACHE"} <= set(env_of(head["template"]["spec"]["containers"][0]))
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and spec["enableInTreeAutoscaling"] is True
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_every_ray_pod_mounts_the_shared_volume_and_keeps_teachers_there(which):
    (claim,) = load_all("k8s/shared-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for group, pod in pod_templates(cluster_specs()[which]):
        volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/shared"]] == claim["metadata"]["name"], group
        assert env_of(container)["TEACHSWEEP_CACHE"] == "/shared/cache", group


def test_ray_images_carry_the_project_dependencies():
    """Jobs install teachsweep with --no-deps: every Ray pod needs the image that carries pyproject's dependencies
    (one image, the same Ray as rayVersion), not a bare rayproject/ray image."""
    images = set()
    for spec in cluster_specs().values():
        for _, pod in pod_templates(spec):
            image = pod["containers"][0]["image"]
            assert not image.startswith(("rayproject/ray:", "docker.io/rayproject/ray:")), image
            assert f":{spec['rayVersion']}-" in image
            images.add(image)
    assert len(images) == 1


# ---------------------------------------------------------------------------------------------- KubeRay: RayJob


def test_rayjob_installs_the_project_like_submit_sh():
    (job,) = load_all("k8s/rayjob.yaml")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shipped = load_all("runtime_env.yaml")[0]
    assert runtime["pip"]["packages"][0] == "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"
    assert "--no-deps" in runtime["pip"]["pip_install_options"]
    if isinstance(shipped.get("pip"), dict):  # the same installation as cluster/submit.sh's
        assert runtime["pip"] == shipped["pip"]
    assert {k: runtime["env_vars"].get(k) for k in shipped.get("env_vars", {})} == shipped.get("env_vars", {})
    assert runtime["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.teachsweep.svc.cluster.local:")
    # Nothing is uploaded from a laptop by a RayJob: the code comes from a remote zip.
    working_dir = urlsplit(runtime["working_dir"])
    assert working_dir.scheme in ("https", "s3", "gs") and working_dir.path.endswith(".zip")


def test_rayjob_runtime_env_reaches_ray_unexpanded():
    """In K8sJobMode (the default) KubeRay passes the runtime env to `ray job submit` as a double-quoted word of a
    `bash -c` script (strconv.Quote in controllers/ray/common/job.go): the submitter's shell would expand
    ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR} to nothing. HTTPMode sends it to the dashboard as it is."""
    (job,) = load_all("k8s/rayjob.yaml")
    as_json = json.dumps(yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    through_shell = subprocess.run(["bash", "-c", f"printf '%s' {json.dumps(as_json)}"], capture_output=True,
                                   text=True, check=True).stdout  # fmt: skip
    assert job["spec"]["submissionMode"] == "HTTPMode" or through_shell == as_json


def test_rayjob_entrypoint_runs_the_sweep_with_results_on_the_shared_volume(tmp_path):
    """Run the entrypoint as Ray's job supervisor does (a shell in the unpacked working dir), with /shared and
    `python` stood in for: the CLI gets the spec by absolute path and runs from the shared volume, so the spec's
    results_dir lands there."""
    from teachsweep.spec import SweepSpec

    (job,) = load_all("k8s/rayjob.yaml")
    entrypoint = job["spec"]["entrypoint"]
    spec_name = re.search(r"(sweeps/\S+?\.yaml)", entrypoint).group(1)
    work, shared, bin_dir, log = tmp_path / "_ray_pkg_0123", tmp_path / "shared", tmp_path / "bin", tmp_path / "log"
    (work / spec_name).parent.mkdir(parents=True)
    (work / spec_name).write_text((ROOT / spec_name).read_text())
    shared.mkdir()
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\n{ pwd; for a in "$@"; do echo "$a"; done; } > "$CALL_LOG"\n')
    (bin_dir / "python").chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALL_LOG": str(log)}
    subprocess.run(entrypoint.replace("/shared", str(shared)), shell=True, cwd=work, env=env, check=True)
    cwd, *args = log.read_text().splitlines()
    assert (
        args[:3] == ["-m", "teachsweep.cli", "run"] and (Path(cwd) / args[3]).resolve() == (work / spec_name).resolve()
    )
    results_dir = yaml.safe_load((ROOT / spec_name).read_text()).get(
        "results_dir", SweepSpec.model_fields["results_dir"].default
    )
    assert (Path(cwd) / results_dir).resolve().is_relative_to(shared.resolve())


# ---------------------------------------------------------------------------------------------- Ray launcher


def launcher():
    return load_all("cluster-launcher.yaml")[0]


def test_launcher_validates_against_the_installed_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # with the AWS defaults filled in, as `ray up` does


def test_launcher_head_starts_the_autoscaler_and_every_node_runs_ray_from_the_setup_venv():
    """Without --autoscaling-config the head never launches the GPU workers (min_workers 0); a bare `ray` would be
    whatever the AMI has on PATH, not the Ray that scripts/setup.sh installed with teachsweep."""
    config = launcher()
    assert config["file_mounts"]["/home/ubuntu/teachsweep"] == "."
    assert any(re.match(r"cd ~/teachsweep && .*bash scripts/setup\.sh$", c) for c in config["setup_commands"])
    assert "TEACHSWEEP_VENV" not in " ".join(config["setup_commands"])
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == 0
    starts = {"head": config["head_start_ray_commands"], "worker": config["worker_start_ray_commands"]}
    for node, commands in starts.items():
        is_ray = lambda word: word == "ray" or word.endswith("/ray")  # noqa: E731
        simple = [shlex.split(part) for c in commands for part in re.split(r";|&&|\|\|", c)]  # simple commands
        rays = [words for words in simple if any(map(is_ray, words))]
        assert [next(filter(is_ray, words)) for words in rays] == [VENV_RAY] * len(rays), node
        assert [words[words.index(VENV_RAY) + 1] for words in rays] == ["stop", "start"], node
        start = rays[-1]
        assert "RAY_AUTH_MODE=token" in start and "TEACHSWEEP_CACHE=/shared/cache" in start, node
    head_start = shlex.split(starts["head"][-1].split(";")[-1])
    assert "--head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_launcher_gives_every_node_the_token_ray_reads():
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR, _get_default_token_path

    config = launcher()
    home = f"/home/{config['auth']['ssh_user']}"
    default_token = _get_default_token_path().relative_to(Path.home())  # Ray reads ~/.ray/auth_token
    assert config["file_mounts"][f"{home}/{default_token}"] == f"~/{default_token}"
    assert any(f"export {AUTH_MODE_ENV_VAR}=token" in c for c in config["initialization_commands"])


def test_launcher_does_not_ship_the_local_venv():
    """rsync --exclude PATTERN without a '/' matches a file or directory name at any depth."""
    patterns = launcher()["rsync_exclude"]
    assert all("/" not in p for p in patterns)
    excluded = lambda path: any(fnmatch.fnmatch(part, p) for part in Path(path).parts for p in patterns)  # noqa: E731
    assert all(map(excluded, [".venv/bin/ray", "teachsweep-results/lot-text/optuna.db", ".git/HEAD"]))
    assert not any(map(excluded, ["lib/teachsweep/cli.py", "scripts/setup.sh", "sweeps/lot_text.yaml"]))


@pytest.mark.parametrize(
    ("mounted", "mount_rc", "fails", "mounts"), [(0, 0, False, False), (1, 0, False, True), (1, 32, True, True)]
)
def test_launcher_mounts_shared_storage_idempotently_and_fails_loudly(tmp_path, mounted, mount_rc, fails, mounts):
    """Run the mount command with `mountpoint` and `sudo` stood in for: skipped when /shared is mounted, a mount
    otherwise, and a failed mount fails the command (so `ray up` stops there)."""
    config = launcher()
    every = [c for key in config if key.endswith("_commands") for c in config[key]]
    assert not [c for c in every if re.search(r"\|\|\s*(true|:)\s*(;|$|\))", c)]
    (command,) = [c for c in config["setup_commands"] if re.search(r"\bmount\b.* /shared\b", c)]
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    (bin_dir / "mountpoint").write_text(f"#!/bin/sh\nexit {mounted}\n")
    (bin_dir / "sudo").write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n[ "$1" = mount ] && exit {mount_rc}\nexit 0\n')
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    rc = subprocess.run(["bash", "-c", command], env=env).returncode
    assert (rc != 0) == fails
    calls = log.read_text().splitlines() if log.exists() else []
    assert any(c.startswith("mount ") and c.endswith(" /shared") for c in calls) == mounts


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


# ---------------------------------------------------------------------------------------------- MLflow


def compose():
    return load_all("mlflow/docker-compose.yaml")[0]["services"]


def k8s_mlflow():
    deployment, service = load_all("k8s/mlflow.yaml")
    return deployment["spec"]["template"]["spec"], service


def server_options(command: list[str]) -> dict[str, str]:
    """`mlflow server` options of an exec-form command: --name=value or --name value."""
    options = {}
    for word, following in zip(command, [*command[1:], None], strict=True):
        if word.startswith("--"):
            name, equals, value = word.removeprefix("--").partition("=")
            options[name] = value if equals else following
    return options


def test_compose_object_store_is_a_published_image_and_the_bucket_exists_before_mlflow():
    services = compose()
    images = {name: s["image"] for name, s in services.items()}
    assert not [i for i in images.values() if re.match(r"(docker\.io/|quay\.io/)?minio/", i)]  # gone / frozen
    assert all(re.search(r":[\w.-]+$", i) and not i.endswith(":latest") for i in images.values())
    mlflow, init = services["mlflow"], services["create-bucket"]
    assert mlflow["depends_on"]["create-bucket"] == {"condition": "service_completed_successfully"}
    assert (
        mlflow["depends_on"]["postgres"] == {"condition": "service_healthy"} and "healthcheck" in services["postgres"]
    )
    bucket = urlsplit(server_options(mlflow["command"])["artifacts-destination"]).netloc
    assert init["environment"]["BUCKET"] == bucket
    endpoint = urlsplit(mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"])
    assert init["environment"]["MLFLOW_S3_ENDPOINT_URL"] == mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"]
    assert endpoint.hostname in services and "seaweedfs" in images[endpoint.hostname] and endpoint.port == 8333
    store = services[endpoint.hostname]
    assert store["environment"]["AWS_ACCESS_KEY_ID"] == mlflow["environment"]["AWS_ACCESS_KEY_ID"]
    assert "ports" not in store and "ports" not in services["postgres"]  # only MLflow is published
    compile(init["command"][-1], "create-bucket", "exec")


def test_k8s_mlflow_creates_its_bucket_before_starting():
    pod, service = k8s_mlflow()
    assert service["spec"]["type"] == "ClusterIP"
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    bucket = urlsplit(server_options(server["command"] + server["args"])["artifacts-destination"]).netloc
    assert env_of(init)["BUCKET"] == bucket
    assert {k: v for k, v in env_of(init).items() if k.startswith(("AWS_", "MLFLOW_S3"))} == {
        k: v for k, v in env_of(server).items() if k.startswith(("AWS_", "MLFLOW_S3"))
    }
    compile(init["command"][-1], "create-bucket", "exec")


def backend_uri(command: list[str], env: dict) -> str:
    """--backend-store-uri, or the environment variable `mlflow server` reads it from."""
    return server_options(command).get("backend-store-uri") or env["MLFLOW_BACKEND_STORE_URI"]


def backend_uris():
    server = compose()["mlflow"]
    yield "compose", server["image"], compose_defaults(backend_uri(server["command"], server["environment"])), server
    pod, _ = k8s_mlflow()
    (container,) = pod["containers"]
    uri = backend_uri(container.get("command", []) + container.get("args", []), env_of(container))
    uri = re.sub(r"\$\((\w+)\)", lambda m: m.group(1).lower().replace("_", "-"), uri)  # Kubernetes $(VAR)
    yield "k8s", container["image"], uri, container


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_mlflow_backend_uri_names_a_driver_the_image_carries(where):
    """ghcr.io/mlflow/mlflow:<v>-full installs mlflow[extras,db,...] (docker/Dockerfile.full in mlflow/mlflow), and
    MLflow's `db` extra brings the driver; the URI names it (a bare postgresql:// follows SQLAlchemy's default,
    psycopg 3 since SQLAlchemy 2.1, psycopg2 before)."""
    import importlib.metadata

    from sqlalchemy.engine import make_url

    (image, uri, container) = next((i, u, c) for w, i, u, c in backend_uris() if w == where)
    assert re.fullmatch(r"ghcr\.io/mlflow/mlflow:v3\.\d+\.\d+-full", image)
    url = make_url(uri)
    assert url.get_backend_name() == "postgresql" and "+" in url.drivername  # explicit driver
    package = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]"}[url.get_dialect().driver]
    assert f'{package}; extra == "db"' in importlib.metadata.requires("mlflow")
    assert "pip install" not in json.dumps(container)  # nothing installed at start


def documented_urls():
    """The URLs users (and the other templates) are told to reach MLflow at, per template."""
    (cluster,) = load_all("k8s/raycluster.yaml")
    (job,) = load_all("k8s/rayjob.yaml")
    in_cluster = {env_of(pod["containers"][0]).get("MLFLOW_TRACKING_URI") for _, pod in pod_templates(cluster["spec"])}
    in_cluster |= {yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]}
    local = {"http://127.0.0.1:5000", "http://localhost:5000"}
    return {
        "compose": local | {"http://mlflow:5000"},
        "k8s": local | {"http://mlflow:5000", "http://mlflow.teachsweep.svc.cluster.local:5000"} | in_cluster - {None},
    }


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_mlflow_allowed_hosts_accept_the_documented_urls(where):
    """Checked with MLflow's own Host-header matching (exact `host:port`, fnmatch for patterns with '*')."""
    security = pytest.importorskip("mlflow.server.security_utils")
    if where == "compose":
        command = compose()["mlflow"]["command"]
    else:
        (container,) = k8s_mlflow()[0]["containers"]
        command = container.get("command", []) + container.get("args", [])
    allowed = [h.strip() for h in compose_defaults(server_options(command)["allowed-hosts"]).split(",")]
    assert "*" not in allowed
    for url in documented_urls()[where]:
        assert security.is_allowed_host_header(allowed, host_header(url)), url
    assert not security.is_allowed_host_header(allowed, "attacker.example:5000")


def test_mlflow_is_published_on_loopback_only_by_default():
    assert all(port.startswith("${MLFLOW_BIND:-127.0.0.1}:") for port in compose()["mlflow"]["ports"])
    assert k8s_mlflow()[1]["spec"]["type"] == "ClusterIP"
