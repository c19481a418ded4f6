"""A sweep on a Ray cluster (RAY_ADDRESS set, as in every Ray job): how many trials it runs at a time, and the
stores it refuses before anything exists because trials on other nodes could not use them (a results directory
they do not see, an SQLite tracking store on a shared filesystem)."""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from teachsweep.spec import SpecError, SweepSpec

# Set by Ray's job supervisor for a job's driver (ray/dashboard/modules/job/job_supervisor.py).
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Concurrency:
    trials: int
    basis: str  # how `trials` was chosen, said in the run's first line

    def line(self, name: str) -> str:
        return f"sweep {name}: {self.trials} trial(s) at a time ({self.basis})"


def on_cluster() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))


def per_trial(spec: SweepSpec) -> dict[str, float]:
    """CPUs and GPUs one trial holds (a multi-worker trial's driver adds a token CPU, see sweep.run_sweep)."""
    workers = spec.resources.workers
    needs = {"CPU": spec.resources.cpus * workers + (0.01 if workers > 1 else 0.0)}
    return needs | ({"GPU": spec.resources.gpus * workers} if spec.resources.gpus else {})


def trials_fitting(spec: SweepSpec, resources: dict[str, float]) -> int:
    return min(math.floor(resources.get(k, 0) / v + 1e-9) for k, v in per_trial(spec).items())


def max_cluster_resources() -> dict[str, float] | None:
    """What the cluster may grow to, from the config its autoscaler reported to the GCS (None when none did:
    Ray 2.60's v1 autoscaler and a cluster without one), as Train V2 reads it
    (ray/train/v2/_internal/execution/worker_group/worker_group.py)."""
    from ray._private.state import state  # heavy: Ray, asked only when a sweep meets its cluster

    try:
        return state.get_max_resources_from_cluster_config() or None
    except Exception:  # noqa: BLE001 - an older GCS without the call: treated as unknown
        return None


def concurrency_for(spec: SweepSpec, planned: int) -> Concurrency:
    """The spec's max_concurrent_trials; else, on a cluster, what it may grow to, or, where that is unknown, every
    planned trial (Tune asks for each and the autoscaler adds nodes for those that wait); else what this
    machine's Ray fits now."""
    import ray  # heavy: Ray, asked only when a sweep meets its cluster

    if spec.max_concurrent_trials:
        return Concurrency(spec.max_concurrent_trials, "max_concurrent_trials")
    now = ray.cluster_resources()
    if not on_cluster():
        if trials_fitting(spec, now) < 1 and spec.resources.gpus:
            raise SpecError(
                f"max_concurrent_trials: the cluster shows {now.get('GPU', 0):g} GPUs now (an "
                "autoscaling cluster adds them later); set max_concurrent_trials to the number of "
                "trials to run at once"
            )
        return Concurrency(max(1, trials_fitting(spec, now)), f"what this machine's Ray fits now: {fmt(now)}")
    grown = max_cluster_resources()
    if grown:
        fitting = trials_fitting(spec, grown)
        if fitting < 1:
            raise SpecError(
                f"resources: a trial needs {fmt(per_trial(spec))} and the cluster can grow to "
                f"{fmt(grown)} at most: ask for less, or give the cluster larger nodes"
            )
        return Concurrency(fitting, f"what the cluster may grow to: {fmt(grown)}")
    return Concurrency(
        max(1, planned, trials_fitting(spec, now)),
        f"every planned trial is queued: the cluster has {fmt(now)} now and its autoscaler adds "
        "nodes for the trials that wait; set max_concurrent_trials to bound it",
    )


def fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}s" for k in ("CPU", "GPU") if k in resources or k == "CPU")


def check_cluster_stores(spec: SweepSpec, root: Path, tracking_uri: str) -> None:
    """On a cluster whose trials run on other nodes: refuse an SQLite tracking store (SQLite's locking is not
    reliable on network filesystems) and a results directory a node does not see (trials would fail at their
    first checkpoint, and the Tune state and the Optuna study would be lost with the head)."""
    import ray  # heavy: Ray, asked only when a sweep meets its cluster

    if not on_cluster():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 and trials_fitting(spec, ray.cluster_resources()) >= 1:
        return  # one node that runs the trials itself
    if tracking_uri.startswith("sqlite:"):
        raise SpecError(
            f"tracking store {tracking_uri} is SQLite and the trials run on other nodes of the cluster "
            "(SQLite is not safe on a shared filesystem): run an MLflow tracking server and set "
            "MLFLOW_TRACKING_URI to it (cluster/README.md, 'MLflow tracking server')"
        )
    blind = nodes_not_seeing(root, nodes) if not in_job_working_dir(root) else ["every other node"]
    if blind:
        raise SpecError(
            f"results directory {root} is not on storage every node sees ({', '.join(blind)} does "
            "not): give --results-dir or TEACHSWEEP_RESULTS_DIR a directory on the shared volume, "
            "e.g. /shared/teachsweep-results"
        )


def in_job_working_dir(root: Path) -> bool:
    """A Ray job runs in its node's own unpacked copy of the working directory."""
    return bool(os.environ.get(JOB_ENV)) and root.resolve().is_relative_to(Path.cwd().resolve())


def sees(path: str) -> bool:
    return os.path.exists(path)


def nodes_not_seeing(root: Path, nodes: list[dict]) -> list[str]:
    """The addresses of the nodes on which a probe file written here does not appear (nodes that do not answer
    within PROBE_TIMEOUT_S are not judged)."""
    import ray  # heavy: Ray, asked only when a sweep meets its cluster
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,  # heavy: Ray, asked only when a sweep meets its cluster
    )

    existing = next(p for p in [root, *root.parents] if p.exists())
    probe = existing / f".teachsweep-shared-probe-{uuid.uuid4().hex}"
    probe.write_text("")
    try:
        check = ray.remote(num_cpus=0)(sees)
        pending = {
            check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(probe)
            ): n["NodeManagerAddress"]
            for n in nodes
        }
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
        for ref in late:
            ray.cancel(ref)
        return sorted({pending[ref] for ref in done if not ray.get(ref)})
    finally:
        probe.unlink(missing_ok=True)
