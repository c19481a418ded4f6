"""Code follows each submission: a Ray head and a worker node started from an environment without teachsweep, a
copy of the repository submitted with its own cluster/submit.sh, a module changed, a second worker node added,
and the copy submitted again. Every process of the second job, on the old node and on the new one, must import
the changed code: Ray caches a runtime env by its name, and a name that does not follow the code (a pip spec's
text) would hand the old node the first submission's package."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import local_servers as servers
import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[1]
SPEC = """
name: code-{version}
job: lot
config: {{task: digits, teacher: "cnn:8", epochs: 1, steps_per_epoch: 2, max_eval_examples: 16}}
space: {{alpha: {{type: uniform, low: 0.1, high: 1.0}}}}
num_samples: 2
max_concurrent_trials: 2
resources: {{cpus: 2}}
"""
# Appended to the copy's package: every process that imports it leaves a file naming the version and its pid.
PROBE = """
import os as _os
if _os.environ.get("TEACHSWEEP_CACHE"):
    _probe = _os.path.join(_os.environ["TEACHSWEEP_CACHE"], "imports")
    _os.makedirs(_probe, exist_ok=True)
    open(_os.path.join(_probe, "{version}-" + str(_os.getpid())), "w").close()
"""


def copy_of_the_repository(where: Path) -> Path:
    """The files git would ship (tracked and untracked, not ignored), without the virtualenv."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, where / name)
    return where


def set_version(repo: Path, version: str) -> None:
    init = repo / "lib" / "teachsweep" / "__init__.py"
    original = (ROOT / "lib" / "teachsweep" / "__init__.py").read_text()
    init.write_text(original + PROBE.format(version=version))
    (repo / "sweeps" / "code.yaml").write_text(SPEC.format(version=version))


def wait_for_cpus(gcs: str, env: dict, cpus: float) -> None:
    deadline = time.time() + 240
    while servers.cluster_cpus(gcs, env) < cpus:
        assert time.time() < deadline, f"the cluster never reached {cpus} CPUs"
        time.sleep(2)


def imports_by_node(cache: Path, nodes: dict[str, subprocess.Popen]) -> dict[str, set[str]]:
    """The versions imported by the processes still running under each node (trial workers stay until the job
    ends; files of processes already gone are not attributed)."""
    seen: dict[str, set[str]] = {name: set() for name in nodes}
    for probe in (cache / "imports").iterdir():
        version, _, pid = probe.name.partition("-")
        try:
            ancestors = {p.pid for p in psutil.Process(int(pid)).parents()}
        except psutil.NoSuchProcess:
            continue
        for name, node in nodes.items():
            if node.pid in ancestors:
                seen[name].add(version)
    return seen


def test_a_second_submission_runs_the_new_code_on_every_node_old_and_new(tmp_path):
    repo = copy_of_the_repository(tmp_path / "repo")
    python = servers.environment_without_teachsweep(tmp_path / "env")
    cache = tmp_path / "cache"
    env = servers.token_auth_env(os.environ) | {"RAY_ADDRESS": ""}
    env.pop("TEACHSWEEP_RESULTS_DIR", None)
    gcs_port, dashboard_port = servers.free_port(), servers.free_port()
    gcs, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
    head = servers.start_ray_head(python, env, gcs_port, dashboard_port, 0, 23000, *servers.SMALL_OBJECT_STORE)
    mlflow_port = servers.free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    server = servers.start_mlflow_server(mlflow_port, env, *servers.sqlite_store(tmp_path))
    nodes = {"head": head}
    submit_env = env | {
        "RAY_BIN": str(servers.BIN / "ray"),
        "TEACHSWEEP_CACHE": str(cache),
        "MLFLOW_TRACKING_URI": tracking,
    }
    results = tmp_path / "results"
    try:
        servers.wait_for(f"{tracking}/health", 180)
        servers.wait_for(f"{dashboard}/api/version", 180)
        nodes["old"] = servers.start_ray_worker(python, env, gcs, 2, 24000)
        wait_for_cpus(gcs, env, 2)
        set_version(repo, "A")
        first = servers.submit_once_an_agent_answers(repo, "sweeps/code.yaml", dashboard, results, submit_env, 900)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        shutil.rmtree(cache / "imports")
        set_version(repo, "B")
        nodes["new"] = servers.start_ray_worker(python, env, gcs, 2, 25000)
        wait_for_cpus(gcs, env, 4)
        second = subprocess.Popen(
            servers.submit_command(repo, "sweeps/code.yaml", dashboard, results),
            env=submit_env,
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen: dict[str, set[str]] = {}
        deadline = time.time() + 600
        while second.poll() is None and time.time() < deadline:  # trial processes live only while the job runs
            if (cache / "imports").exists():
                for name, versions in imports_by_node(cache, nodes).items():
                    seen.setdefault(name, set()).update(versions)
            time.sleep(0.5)
        output = second.communicate(timeout=300)[0]
        assert second.returncode == 0, output[-4000:]
        assert {f.name.partition("-")[0] for f in (cache / "imports").iterdir()} == {"B"}, sorted(
            f.name for f in (cache / "imports").iterdir()
        )
        assert seen.get("old") == {"B"} and seen.get("new") == {"B"}, seen
    finally:
        for process in [*nodes.values(), server]:
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
