"""A multi-node Ray cluster on one machine: a head that only schedules and two worker nodes, each its own raylet
started with `ray start` (distinct ports, its own temp dir) from a Python that cannot import teachsweep, so every
node gets the code from the submission's runtime env; an `mlflow server` on PostgreSQL with proxied artifacts
(--serve-artifacts), as the templates deploy it; one shared results directory. Sweeps are Ray jobs submitted with
cluster/submit.sh, their drivers on the head, as on a real cluster. Faults, each with its counts in the assertion
messages: a worker node lost while its trial runs; the MLflow server down for tens of seconds mid-sweep; the
driver killed on the cluster and the sweep resumed by another submission. Load: 32 short trials, 4 at a time
across the nodes, every epoch logged to the server."""

import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import local_servers as servers
import optuna
import psutil
import pytest
import yaml
from local_postgres import postgres_server
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).parents[1]
WORKER_CPUS = 2


@dataclass
class LocalCluster:
    root: Path
    env: dict
    python: Path  # an environment that cannot import teachsweep: the nodes' Python
    backend: str  # the MLflow server's PostgreSQL
    gcs: str = ""
    dashboard: str = ""
    tracking: str = ""
    mlflow_port: int = 0
    mlflow: subprocess.Popen | None = None
    head: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    specs: list[Path] = field(default_factory=list)

    def start_mlflow(self) -> None:
        artifacts = ("--serve-artifacts", "--artifacts-destination", (self.root / "artifacts").as_uri())
        self.mlflow = servers.start_mlflow_server(
            self.mlflow_port, self.env, "--backend-store-uri", self.backend, *artifacts, workers=2
        )
        servers.wait_for(f"{self.tracking}/health", 120)

    def add_worker(self) -> subprocess.Popen:
        """A worker node: its own raylet, object manager and agents on their own ports. Nodes sharing a machine
        also share the head's session directory, where `ray start` names its sockets by checking which names are
        taken: two nodes starting at once can pick the same socket, so nodes here are started one at a time. Each
        has its own --temp-dir, as on its own machine: the runtime env agent unpacks packages there."""
        low = 21000 + 1000 * (len(self.workers) % 8)
        log = open(self.root / f"worker-{len(self.workers)}.log", "w")  # open for the node's lifetime
        worker = servers.start_ray_worker(self.python, self.env, self.gcs, WORKER_CPUS, low, log)
        self.workers.append(worker)
        return worker

    def add_workers(self, count: int) -> None:
        """`count` nodes, each joined before the next starts; a node whose `ray start` exits before joining (a port
        taken between choosing and binding it, say) is replaced, twice at most."""
        for _ in range(count):
            cpus = self.alive_cpus()
            joined = any(self.wait_for_cpus(cpus + WORKER_CPUS, node=self.add_worker()) for _ in range(3))
            assert joined, f"no node joined in 3 starts\n{self.node_logs()}"

    def node_logs(self) -> str:
        """Each worker node's state and the end of its `ray start` output, for failure messages."""
        return "\n".join(
            f"worker {i} ({'running' if w.poll() is None else f'exited {w.returncode}'}): "
            + (self.root / f"worker-{i}.log").read_text()[-1500:]
            for i, w in enumerate(self.workers)
        )

    def alive_cpus(self) -> float:
        return servers.cluster_cpus(self.gcs, self.env)

    def wait_for_cpus(self, cpus: float, seconds: float = 180, node: subprocess.Popen | None = None) -> bool:
        """Wait until the cluster has `cpus` CPUs (True) or `node` has exited (False); fail after `seconds`."""
        deadline = time.time() + seconds
        while (found := self.alive_cpus()) < cpus:
            if node is not None and node.poll() is not None:
                return False
            assert time.time() < deadline, f"cluster has {found} CPUs, expected {cpus}\n{self.node_logs()}"
            time.sleep(2)
        return True

    def node_of(self, pid: int) -> subprocess.Popen | None:
        """The worker node (its `ray start` process) whose raylet runs process `pid`."""
        ancestors = {p.pid for p in psutil.Process(pid).parents()}
        return next((w for w in self.workers if w.poll() is None and w.pid in ancestors), None)

    def sweep(self, spec: dict) -> subprocess.Popen:
        """A Ray job running `teachsweep run` on the head, submitted with cluster/submit.sh; the spec lives in the
        repository (specs are shipped with it) until the cluster is thrown away."""
        path = ROOT / "tests" / f"_faults_{spec['name']}_{secrets.token_hex(3)}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        self.specs.append(path)
        env = self.env | {"RAY_BIN": str(servers.BIN / "ray"), "MLFLOW_TRACKING_URI": self.tracking}
        return subprocess.Popen(
            servers.submit_command(ROOT, str(path), self.dashboard, self.root / "results"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def drivers(self, name: str) -> list[psutil.Process]:
        """The job driver processes (`python -m teachsweep.cli run ...`) of sweep `name` under the head."""
        found = []
        for process in psutil.Process(self.head.pid).children(recursive=True):
            try:
                words = process.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "teachsweep.cli" in words and any(f"_faults_{name}_" in w for w in words):
                found.append(process)
        return found


def stop(process: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if process is not None and process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    unset = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "TEACHSWEEP_RESULTS_DIR")
    env = servers.token_auth_env({k: v for k, v in os.environ.items() if k not in unset})
    env["TEACHSWEEP_CACHE"] = str(root / "cache")
    python = servers.environment_without_teachsweep(root / "env")
    with postgres_server() as backend:
        local = LocalCluster(root, env, python, backend, mlflow_port=servers.free_port())
        local.tracking = f"http://127.0.0.1:{local.mlflow_port}"
        gcs_port, dashboard_port = servers.free_port(), servers.free_port()
        local.gcs, local.dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
        local.head = servers.start_ray_head(
            python, env, gcs_port, dashboard_port, 0, 20000, *servers.SMALL_OBJECT_STORE
        )
        try:
            local.start_mlflow()
            servers.wait_for(f"{local.dashboard}/api/version", 180)
            local.add_workers(2)
            yield local
        finally:  # the cluster is thrown away: no graceful shutdown (each process group killed at once)
            for process in [*local.workers, local.head, local.mlflow]:
                stop(process, signal.SIGKILL)
            for path in local.specs:
                path.unlink(missing_ok=True)


def trial_runs(local: LocalCluster, name: str):
    client = MlflowClient(local.tracking)
    experiment = client.get_experiment_by_name(name)
    return client, client.search_runs([experiment.experiment_id], "tags.`teachsweep.role` = 'trial'")


def lot_spec(name: str, epochs: int, steps: int, **extra) -> dict:
    config = {
        "task": "digits",
        "teacher": "cnn:8",
        "alpha": 0.5,
        "student_steps": 1,
        "epochs": epochs,
        "steps_per_epoch": steps,
        "batch_size": 32,
        "lr": 0.05,
        "optimizer": "sgd",
        "max_eval_examples": 64,
    }
    return {"name": name, "job": "lot", "config": config} | extra


def epochs_logged(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "teacher/val_acc"))


def test_a_lost_worker_node_restarts_its_trial_elsewhere_from_its_checkpoint_into_the_same_run(cluster):
    epochs = 5
    # two CPUs per trial: one trial per worker node, so the two trials run on different nodes
    spec = lot_spec(
        "node-loss",
        epochs,
        60,
        space={"alpha": {"type": "uniform", "low": 0.1, "high": 1.0}},
        num_samples=2,
        resources={"cpus": WORKER_CPUS},
        max_failures=2,
        max_concurrent_trials=2,
    )
    driver = cluster.sweep(spec)
    lost, nodes_before = None, set()
    deadline = time.time() + 400
    while lost is None and time.time() < deadline and driver.poll() is None:
        time.sleep(1)
        try:
            client, runs = trial_runs(cluster, "node-loss")
        except AttributeError:  # the experiment does not exist yet
            continue
        nodes_before = {r.data.tags.get("teachsweep.node") for r in runs} - {None}
        for run in runs:
            if len(nodes_before) == 2 and len(epochs_logged(client, run.info.run_id)) >= 2:
                node = cluster.node_of(int(run.data.tags["teachsweep.pid"].rpartition(":")[2]))
                if node is not None:
                    os.killpg(node.pid, signal.SIGKILL)  # the node's raylet and its workers, as a machine lost
                    node.wait()
                    # counted once the node is dead: the trial kept training between the read above and the kill,
                    # and it logs an epoch to MLflow before it hands that epoch's checkpoint to Tune
                    lost = (
                        run.info.run_id,
                        run.data.tags["teachsweep.node"],
                        len(epochs_logged(client, run.info.run_id)),
                    )
                    cluster.add_worker()  # a replacement joins, as an autoscaler would bring one
                    break
    output = driver.communicate(timeout=900)[0]
    assert lost is not None, f"no trial reached 2 epochs on one of 2 nodes (nodes seen: {len(nodes_before)})\n{output}"
    assert driver.returncode == 0, output[-4000:]
    client, runs = trial_runs(cluster, "node-loss")
    run_id, lost_node, epochs_before = lost
    (restarted,) = [r for r in runs if r.info.run_id == run_id]
    history = epochs_logged(client, run_id)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs), (
        f"{len(runs)} trial runs (expected 2), statuses {[r.info.status for r in runs]}"
    )
    assert history == list(range(1, epochs + 1)), f"epochs logged into the restarted trial's run: {history}"
    assert restarted.data.tags["teachsweep.node"] != lost_node, "the trial finished on the node that was lost"
    resumed_from = restarted.data.metrics.get("trial/resumed_from_epoch", 0)
    assert 1 <= resumed_from <= epochs_before, (resumed_from, epochs_before)  # from its last checkpoint, not epoch 0
    study = optuna.load_study(
        study_name="node-loss", storage=f"sqlite:///{cluster.root / 'results' / 'node-loss' / 'optuna.db'}"
    )
    states = [t.state.name for t in study.trials]
    assert states.count("RUNNING") == 0 and states.count("COMPLETE") == 2, states
    print(
        f"node loss: trial lost its node after {epochs_before} logged epochs, resumed from epoch {resumed_from:.0f} "
        f"on another node; {len(runs)} runs, {len(history)} epochs logged once each; Optuna {states}"
    )
    cluster.wait_for_cpus(2 * WORKER_CPUS)


def test_the_mlflow_server_down_mid_sweep_loses_no_metric_and_fails_no_trial(cluster):
    epochs, outage_s = 6, 30
    spec = lot_spec(
        "mlflow-outage", epochs, 40, variants={"a": {"alpha": 0.5}, "b": {"alpha": 1.0}}, max_concurrent_trials=2
    )
    driver = cluster.sweep(spec)
    deadline = time.time() + 400
    while time.time() < deadline and driver.poll() is None:
        time.sleep(1)
        try:
            client, runs = trial_runs(cluster, "mlflow-outage")
        except AttributeError:  # the experiment does not exist yet
            continue
        if runs and max(len(epochs_logged(client, r.info.run_id)) for r in runs) >= 1:
            break
    stop(cluster.mlflow, signal.SIGKILL)
    down_at = time.time()
    time.sleep(outage_s)
    cluster.start_mlflow()
    down_for = time.time() - down_at
    output = driver.communicate(timeout=900)[0]
    assert driver.returncode == 0, output[-4000:]
    client, runs = trial_runs(cluster, "mlflow-outage")
    histories = {r.data.tags["teachsweep.label"]: epochs_logged(client, r.info.run_id) for r in runs}
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    assert all(h == list(range(1, epochs + 1)) for h in histories.values()), (
        f"server down {down_for:.0f} s; epochs logged per trial: {histories}"
    )
    print(
        f"MLflow outage: server down {down_for:.0f} s mid-sweep; {len(runs)} trials FINISHED, epochs logged per "
        f"trial {[len(h) for h in histories.values()]} of {epochs}"
    )


def test_load_32_short_trials_4_at_a_time_across_the_nodes_lose_no_metric(cluster):
    trials, epochs = 32, 3
    spec = lot_spec(
        "load",
        epochs,
        2,
        space={"alpha": {"type": "uniform", "low": 0.1, "high": 1.0}},
        num_samples=trials,
        max_concurrent_trials=2 * WORKER_CPUS,
    )
    started = time.time()
    driver = cluster.sweep(spec)
    output = driver.communicate(timeout=1200)[0]
    seconds = time.time() - started
    assert driver.returncode == 0, output[-4000:]
    client, runs = trial_runs(cluster, "load")
    logged = {r.info.run_id: epochs_logged(client, r.info.run_id) for r in runs}
    nodes = {r.data.tags.get("teachsweep.node") for r in runs}
    import psycopg2

    with psycopg2.connect(cluster.backend.replace("postgresql+psycopg2", "postgresql")) as db, db.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid = ANY(%s)", ([r.info.run_id for r in runs],))
        (values,) = cursor.fetchone()  # every value the server stored for these runs
    print(
        f"load: {len(runs)} trials in {seconds:.0f} s = {60 * len(runs) / seconds:.1f} trials/min; {values} metric "
        f"values = {values / seconds:.1f}/s through the server; {len(nodes)} nodes"
    )
    assert len(runs) == trials and all(r.info.status == "FINISHED" for r in runs), (
        f"{len(runs)} runs, {sum(r.info.status == 'FINISHED' for r in runs)} finished (expected {trials})"
    )
    lost = {k: v for k, v in logged.items() if v != list(range(1, epochs + 1))}
    assert not lost, f"{len(lost)} of {trials} trials lost epochs: {lost}"
    assert len(nodes) >= 2, f"trials ran on {len(nodes)} node(s)"


def test_a_driver_killed_on_the_cluster_resumes_from_another_submission(cluster):
    """The job's driver on the head is SIGKILLed once a trial has finished and another has not; a second
    submission of the same spec (another driver) resumes: the finished trials keep their runs, the rest finish,
    no run is duplicated and the Optuna study holds no trial left RUNNING."""
    trials, epochs = 4, 3
    spec = lot_spec(
        "driver-kill",
        epochs,
        30,
        space={"alpha": {"type": "uniform", "low": 0.1, "high": 1.0}},
        num_samples=trials,
        resources={"cpus": WORKER_CPUS},
        max_concurrent_trials=2,
    )
    first = cluster.sweep(spec)
    finished_before: set[str] = set()
    killed = False
    deadline = time.time() + 600
    while not killed and time.time() < deadline and first.poll() is None:
        time.sleep(1)
        try:
            _, runs = trial_runs(cluster, "driver-kill")
        except AttributeError:  # the experiment does not exist yet
            continue
        finished_before = {r.info.run_id for r in runs if r.info.status == "FINISHED"}
        if finished_before and len(finished_before) < trials:
            for driver in cluster.drivers("driver-kill"):
                driver.kill()
                killed = True
    first_output = first.communicate(timeout=300)[0]
    assert killed, f"no driver killed between the first and the last finished trial\n{first_output[-3000:]}"
    assert first.returncode != 0, "the killed job reported success"
    second = cluster.sweep(spec)
    output = second.communicate(timeout=1200)[0]
    assert second.returncode == 0, output[-4000:]
    client, runs = trial_runs(cluster, "driver-kill")
    ids = [r.info.run_id for r in runs]
    finished = {r.info.run_id for r in runs if r.info.status == "FINISHED"}
    assert finished_before <= finished, "a trial finished before the kill lost its run"
    assert len(finished) == trials and len(ids) == len(set(ids)), (
        f"{len(ids)} trial runs, {len(finished)} finished (expected {trials})"
    )
    assert all(epochs_logged(client, run_id) == list(range(1, epochs + 1)) for run_id in finished)
    study = optuna.load_study(
        study_name="driver-kill", storage=f"sqlite:///{cluster.root / 'results' / 'driver-kill' / 'optuna.db'}"
    )
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and states.count("COMPLETE") >= trials, states
    print(
        f"driver kill: {len(finished_before)} of {trials} trials finished before the driver was killed; the "
        f"second submission finished the rest, {len(ids)} runs in all; Optuna {states}"
    )
