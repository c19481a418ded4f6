"""Reading a sweep back: its spec, MLflow runs and Optuna study, for the CLI (status, best, export, list) and
for notebooks. Everything is found from the sweep's name and its results directory."""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from teachsweep.jobs import JOBS
from teachsweep.layout import DEFAULT_RESULTS, SweepDir, missing_sqlite_file
from teachsweep.metrics import (
    merge_seed_trials,
)
from teachsweep.ranking import best_of_rows, pareto_front
from teachsweep.spec import SpecError, SweepSpec, parse_spec, read_spec_file
from teachsweep.teacher_refs import CHECKPOINT_FILES, TeacherReferenceError, parse_sweep
from teachsweep.tracking import RetryingClient


@dataclass
class Sweep:
    name: str
    directory: Path
    spec: SweepSpec
    spec_text: str
    tracking_uri: str
    parent_run_id: str | None
    moved_from: Path | None = None  # the results directory the local store was in when the runs were logged

    @property
    def layout(self) -> SweepDir:
        return SweepDir.at(self.directory)

    @property
    def optuna_url(self) -> str:
        return self.layout.optuna_url

    @property
    def planned_trials(self) -> int | None:
        """As the run counted them when it started (planning again would look for the sweeps its teachers came
        from, and reading never depends on those); None until the run has counted them."""
        recorded = self.layout.planned
        return int(recorded.read_text()) if recorded.is_file() else None


def open_sweep(name: str, results_dir: str | Path = DEFAULT_RESULTS) -> Sweep:
    """The sweep NAME from its results directory: its own files and tracking store only (no preflight)."""
    layout = SweepDir.of(name, results_dir)
    directory, spec_file = layout.path, layout.spec_file
    if not spec_file.is_file():
        raise SpecError(f"no sweep named '{name}' in {directory.parent}")
    text = read_spec_file(spec_file)
    spec = parse_spec(text, where=f"{spec_file}: ", check_files=False)
    uri_file, parent_file = layout.tracking_uri, layout.parent_run
    moved_from = None
    if uri_file.exists():
        recorded_uri = uri_file.read_text().strip()
        uri = local_store_of(recorded_uri, layout)
        if uri != recorded_uri:
            moved_from = Path(recorded_uri.removeprefix("sqlite:///")).parent
    else:
        uri = f"sqlite:///{layout.local_store}"
    if missing_sqlite_file(uri):  # no store yet: a sweep that never started (opening one would create it)
        if parent_file.exists():
            raise SpecError(
                f"{parent_file}: tracking store {uri.removeprefix('sqlite:///')} not found (moved or deleted)"
            )
        return Sweep(name, directory, spec, text, uri, None, moved_from)
    check_sqlite_store(uri)
    if parent_file.exists():
        parent = parent_file.read_text().strip()
        check_run_exists(uri, parent, parent_file)
    else:
        parent = latest_parent_run(uri, spec)
    return Sweep(name, directory, spec, text, uri, parent, moved_from)


def artifact_directory(sweep: Sweep, run_id: str) -> Path | None:
    """Where a run's artifacts are on this machine: its artifact location, or, for a local store whose results
    directory moved, the same place under the directory's new location (None: not a local directory)."""

    uri = RetryingClient(sweep.tracking_uri).get_run(run_id).info.artifact_uri
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(unquote(parsed.path))
    if not path.exists() and sweep.moved_from is not None and path.is_relative_to(sweep.moved_from):
        path = sweep.layout.root / path.relative_to(sweep.moved_from)
    return path


def run_artifact(sweep: Sweep, run_id: str, name: str) -> Path | None:
    """A run's artifact file on this machine (downloaded when its store is remote); None when it has none."""

    directory = artifact_directory(sweep, run_id)
    if directory is not None:
        return directory / name if (directory / name).is_file() else None
    client = RetryingClient(sweep.tracking_uri)
    if name not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        return None
    return Path(client.download_artifacts(run_id, name))


def check_sqlite_store(uri: str) -> None:
    """A one-line SpecError when a SQLite tracking store is not a database (opened read-only: nothing is written)."""

    if not uri.startswith("sqlite:///"):
        return
    path = uri.removeprefix("sqlite:///")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            db.execute("select count(*) from sqlite_master").fetchone()
    except sqlite3.DatabaseError as error:
        # only a file that is not SQLite at all: a journal a read-only handle cannot roll back is a writer's, not ours
        if "not a database" in str(error):
            raise SpecError(f"{path}: not a readable MLflow store ({error})") from None


def check_run_exists(uri: str, run_id: str, named_in: Path) -> None:
    """A one-line SpecError when the run a sweep recorded is not in its store (deleted, or the store replaced)."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow loads when a store is read, not when the CLI starts

    try:
        RetryingClient(uri).get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise SpecError(
            f"{named_in}: MLflow run {run_id} is not in the tracking store {uri} (deleted, or the store was replaced)"
        ) from None


def local_store_of(uri: str, layout: SweepDir) -> str:
    """A recorded SQLite store that is no longer where it was: the one beside the sweep when the results directory
    moved, else a one-line SpecError. MLflow would otherwise create an empty store at the old path and show the
    sweep as never started."""
    if not missing_sqlite_file(uri):
        return uri
    if layout.local_store.is_file():
        return f"sqlite:///{layout.local_store}"
    raise SpecError(
        f"{layout.tracking_uri}: tracking store {uri.removeprefix('sqlite:///')} not found (moved or "
        f"deleted), and no {layout.local_store.name} beside the sweep in {layout.root}"
    )


def latest_parent_run(uri: str, spec: SweepSpec) -> str | None:
    """The newest parent run tagged with the sweep's name (for results directories without the id file)."""

    client = RetryingClient(uri)
    experiment = client.get_experiment_by_name(spec.experiment or spec.name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`teachsweep.sweep` = '{spec.name}' and tags.`teachsweep.role` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_logged_sweep(name: str, tracking_uri: str, results_dir: str | Path = DEFAULT_RESULTS) -> Sweep:
    """A sweep read back from its parent run in a tracking store (the spec it logged there), for a sweep whose
    results directory is gone: the earlier sweep a finished one took its teachers from, moved away."""

    client = RetryingClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`teachsweep.sweep` = '{name}' and tags.`teachsweep.role` = 'parent'"
    runs = (
        client.search_runs(experiments, filter_string=query, order_by=["attributes.start_time DESC"], max_results=1)
        if experiments
        else []
    )
    directory = SweepDir.of(name, results_dir).path
    if not runs:
        raise SpecError(f"no sweep named '{name}' in {directory.parent} or in {tracking_uri}")
    run_id = runs[0].info.run_id
    with tempfile.TemporaryDirectory() as scratch:
        text = Path(client.download_artifacts(run_id, "spec.yaml", scratch)).read_text()
    spec = parse_spec(text, where=f"spec.yaml of MLflow run {run_id}: ", check_files=False)
    return Sweep(name, directory, spec, text, tracking_uri, run_id)


def list_sweeps(results_dir: str | Path = DEFAULT_RESULTS) -> list[str]:
    root = Path(results_dir).expanduser()
    return sorted(p.parent.name for p in root.glob("*/spec.yaml")) if root.is_dir() else []


def trial_runs(sweep: Sweep):
    """A DataFrame of the sweep's trial runs (run_id, status, start_time, params.*, metrics.*, tags.*), one row
    per trial, like `mlflow.search_runs` gives, but through a client: no process-wide tracking URI is set (a
    notebook or a driver that reads one sweep must not redirect the next sweep's logging)."""
    import pandas as pd  # heavy: only the readers that build tables load it

    if sweep.parent_run_id is None:
        return pd.DataFrame()
    client = RetryingClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.spec.experiment or sweep.name)
    if experiment is None:
        return pd.DataFrame()
    query = f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}' and tags.`teachsweep.role` = 'trial'"
    runs = client.search_runs([experiment.experiment_id], filter_string=query, max_results=50_000)
    rows = [
        {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
            **{f"params.{k}": v for k, v in run.data.params.items()},
            **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
            **{f"tags.{k}": v for k, v in run.data.tags.items()},
        }
        for run in runs
    ]
    return pd.DataFrame(rows)


def teacher_runs(sweep: Sweep) -> dict[str, str]:
    """{trial id: MLflow run id} of the sweep's finished trials that saved a teacher (`model.pt`; for a trial that
    ran several seeds, its first seed's run)."""

    client = RetryingClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.spec.experiment or sweep.name)
    if experiment is None:
        return {}
    query = f"tags.`teachsweep.sweep` = '{sweep.name}' and tags.`teachsweep.teacher_artifact` = 'model.pt'"
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=query, max_results=50_000, order_by=["attributes.start_time ASC"]
    )
    out: dict[str, str] = {}
    for run in runs:
        trial = run.data.tags.get("teachsweep.trial_id")
        if run.info.status == "FINISHED" and trial and trial not in out:
            out[trial] = run.info.run_id
    return out


def sweep_teachers(value: str, field: str, results_dir: str | Path) -> dict[str, str]:
    """{trial id: MLflow run id} of the teachers a `sweep:` reference selects, from the earlier sweep's own
    store (finished trials that logged a teacher; for a trial that ran several seeds, its first seed's)."""
    name, selector = parse_sweep(value, field)
    try:
        sweep = open_sweep(name, results_dir)
    except SpecError:
        raise TeacherReferenceError(f"{field}: no sweep named '{name}' in {Path(results_dir).resolve()}") from None
    teachers = teacher_runs(sweep)
    if not teachers:
        raise TeacherReferenceError(f"{field}: sweep '{name}' has no finished trial that saved a teacher")
    if selector == "each":
        return teachers
    if selector == "best":
        best = best_trials(sweep)
        trial = str(best[0].get("trial_id")) if best else None
        if trial not in teachers:
            raise TeacherReferenceError(f"{field}: sweep '{name}' has no best trial with a saved teacher")
        return {trial: teachers[trial]}
    if selector not in teachers:
        raise TeacherReferenceError(
            f"{field}: sweep '{name}' has no finished trial '{selector}' with a saved teacher "
            f"(trials: {', '.join(sorted(teachers))})"
        )
    return {selector: teachers[selector]}


def status(sweep: Sweep) -> dict[str, Any]:
    runs = trial_runs(sweep)
    counts = runs["status"].value_counts().to_dict() if len(runs) else {}
    parent = RetryingClient(sweep.tracking_uri).get_run(sweep.parent_run_id) if sweep.parent_run_id else None
    start = parent.info.start_time / 1000 if parent else time.time()
    end = parent.info.end_time / 1000 if parent and parent.info.status != "RUNNING" and parent.info.end_time else None
    # trials a driver left RUNNING when it stopped (killed, crashed) run no more: they are resumed as new trials
    alive = parent is not None and parent.info.status == "RUNNING"
    return {
        "planned": sweep.planned_trials,
        "finished": counts.get("FINISHED", 0),
        "running": counts.get("RUNNING", 0) if alive else 0,
        "interrupted": 0 if alive else counts.get("RUNNING", 0),
        "failed": counts.get("FAILED", 0),
        "sweep_status": parent.info.status if parent else "NOT STARTED",
        "elapsed_s": (end or time.time()) - start,
        "best": best_trials(sweep, runs),
    }


def best_trials(sweep: Sweep, runs=None) -> list[dict[str, Any]]:
    """Single objective: the trial the verdict names (`best_of_rows` over the trials read back). Several: the
    Pareto front."""
    runs = trial_runs(sweep) if runs is None else runs
    spec = sweep.spec
    if not len(runs):
        return []
    if len(spec.objectives) > 1 and spec.space:
        return pareto_front(spec, sweep.optuna_url, runs[runs["status"] == "FINISHED"])
    return best_of_rows(spec, trial_rows(sweep, runs))


def full_config(sweep: Sweep, run_id: str) -> dict[str, Any]:
    """The complete job config a trial ran, read back from its MLflow params and typed by the job's model."""

    params = RetryingClient(sweep.tracking_uri).get_run(run_id).data.params
    fields = JOBS[sweep.spec.job].config_class.model_fields
    config = {k: yaml.safe_load(v) if v != "None" else None for k, v in params.items() if k in fields}
    return JOBS[sweep.spec.job].config_class.model_validate(config).model_dump()


def saved_teacher(sweep: Sweep, run_id: str) -> str | None:
    """The MLflow run holding the teacher (model.pt and config.json) that the trial of run `run_id` saved: the
    run itself, or for a trial that ran several seeds its first seed's run; None when it saved none."""

    client = RetryingClient(sweep.tracking_uri)
    trial = client.get_run(run_id).data.tags.get("teachsweep.trial_id")
    teacher = teacher_runs(sweep).get(trial) if trial else None
    if teacher is None:
        return None
    directory = artifact_directory(sweep, teacher)
    if directory is not None:
        logged = {path.name for path in directory.iterdir()} if directory.is_dir() else set()
    else:
        logged = {artifact.path for artifact in client.list_artifacts(teacher)}
    return teacher if all(name in logged for name in CHECKPOINT_FILES) else None


def variant_of(label: str, variants: list[str]) -> str:
    """The variant a trial label starts with ('lm' of 'lm-teacher_only-N5'); '' for searched trials."""
    return max((v for v in variants if label == v or label.startswith(f"{v}-")), key=len, default="")


def trial_rows(sweep: Sweep, runs=None, merge_seeds: bool = True) -> list[dict[str, Any]]:
    """The sweep's finished trials as the runner's rows ({trial_id, label, params, status, metrics}), read from
    MLflow: params typed back, `variant` from the label, per-seed values as `metric@seedN` (from the seed runs of
    a trial that ran several seeds; a grid's one-seed trials merged into one row per label unless not
    `merge_seeds`)."""

    runs = trial_runs(sweep) if runs is None else runs
    if not len(runs):
        return []
    variants = list(sweep.spec.variants)
    client = RetryingClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.spec.experiment or sweep.name)
    seed_runs: dict[str, dict[str, float]] = {}
    query = f"tags.`teachsweep.sweep` = '{sweep.spec.name}' and tags.`teachsweep.role` = 'seed'"
    for run in client.search_runs([experiment.experiment_id], filter_string=query, max_results=50_000):
        if run.info.status == "FINISHED":
            seed = run.data.tags["teachsweep.seed"]
            values = {f"{k}@seed{seed}": v for k, v in run.data.metrics.items()}
            seed_runs.setdefault(run.data.tags.get("mlflow.parentRunId", ""), {}).update(values)
    rows = []
    for _, run in runs[runs["status"] == "FINISHED"].iterrows():
        params = {k[7:]: yaml.safe_load(v) for k, v in run.items() if k.startswith("params.") and isinstance(v, str)}
        metrics = {k[8:]: float(v) for k, v in run.items() if k.startswith("metrics.") and v == v}
        params["variant"] = variant_of(run["tags.teachsweep.label"], variants)
        params.pop("seeds", None)
        rows.append(
            {
                "trial_id": run["tags.teachsweep.trial_id"],
                "label": run["tags.teachsweep.label"],
                "params": params,
                "status": "OK",
                "metrics": metrics | seed_runs.get(run["run_id"], {}),
                "mlflow_run_id": run["run_id"],
            }
        )
    return merge_seed_trials(rows) if merge_seeds else rows
