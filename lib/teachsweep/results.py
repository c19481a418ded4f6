"""Reading a sweep back: its spec, MLflow runs and Optuna study, for the CLI (status, best, export, list) and
for notebooks. Everything is found from the sweep's name and its results directory."""

from __future__ import annotations

import contextlib
import sqlite3
import statistics
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from teachsweep.jobs import JOBS
from teachsweep.layout import DEFAULT_RESULTS, SweepDir
from teachsweep.metrics import (
    by_teacher,
    compare_to_best,
    interval_of,
    interval_text,
    merge_seed_trials,
    per_seed,
    split_of,
)
from teachsweep.spec import SpecError, SweepSpec, parse_spec, read_spec_file
from teachsweep.teacher_refs import CHECKPOINT_FILES, parse_sweep
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
    from urllib.parse import unquote, urlparse

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
    from mlflow.exceptions import MlflowException

    try:
        RetryingClient(uri).get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise SpecError(
            f"{named_in}: MLflow run {run_id} is not in the tracking store {uri} (deleted, or the store was replaced)"
        ) from None


def missing_sqlite_file(url: str) -> bool:
    """A `sqlite:///` URL whose file is absent (opening it would create an empty store)."""
    return url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file()


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
    directory = Path(results_dir).expanduser().resolve() / name
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


def pick_best(candidates: list[tuple[float, str, Any]], mode: str) -> Any:
    """THE best-trial rule, for the runner and the CLI alike: among finished trials that reported the objective,
    the highest (mode max) or lowest final value; ties go to the smallest trial id. `candidates` are
    (value, trial id, payload); returns the payload, or None."""
    finite = [c for c in candidates if c[0] == c[0]]  # NaN never wins
    if not finite:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(finite, key=lambda c: (sign * c[0], c[1]))[2]


def best_of_rows(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Single objective: the trial the verdict names (`verdict_pick`: baseline arms only when every trial is one,
    a multi-seed trial by its mean over seeds), as the best entry that the runner, `status`, `export` and
    `sweep:<name>/best` all share."""
    best = verdict_pick(spec, rows)
    if best is None:
        return []
    metric = spec.metric_names[0]
    keys = list(spec.space) or sorted({k for v in spec.variants.values() for k in v} | {"arm", "seed"})
    return [
        {
            "params": {k: best["params"][k] for k in keys if k in best["params"]},
            "values": {metric: point_of(best, metric)},
            "trial_id": best["trial_id"],
            "label": best["label"],
            "mlflow_run_id": best["mlflow_run_id"],
        }
    ]


def pareto_front(spec: SweepSpec, storage_url: str, runs=None) -> list[dict[str, Any]]:
    """Several objectives: the Pareto front of the sweep's Optuna study (searched trials), each matched to its
    MLflow run by parameters when `runs` (finished trial runs) are given."""
    import optuna  # heavy: only the Pareto front reads the study

    if missing_sqlite_file(storage_url):
        return []  # never searched here (or moved away): opening it would create an empty study file
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage_url)
    except KeyError:
        return []
    front = []
    for trial in study.best_trials:
        entry = {
            "params": trial.params,
            "values": dict(zip(spec.metric_names, trial.values, strict=True)),
            "optuna_trial": trial.number,
        }
        if runs is not None:
            entry["mlflow_run_id"] = match_run(runs, trial.params)
        front.append(entry)
    return front


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


def match_run(runs, params: dict[str, Any]) -> str | None:
    for _, row in runs.iterrows():
        if all(str(row.get(f"params.{k}")) == str(v) for k, v in params.items()):
            return row["run_id"]
    return None


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


def is_baseline(row: dict[str, Any], job) -> bool:
    """A trial of the job's fixed comparison arms (an `arm` other than its DEFAULT_ARM, LoT's teacher-only) or of
    its REFERENCE_ARM variant (SMaT's `none`): known through the job protocol only."""
    arm = row["params"].get("arm")
    return (job.default_arm is not None and arm not in (None, job.default_arm)) or (
        job.reference_arm is not None and row["label"] == job.reference_arm
    )


def teacher_effect(students: Sweep) -> tuple[str, list[dict[str, Any]]] | None:
    """For a sweep whose trials took their teachers from an earlier sweep (`sweep:<name>/each`, tagged
    `teachsweep.teacher`): the teacher sweep's name and `metrics.by_teacher` rows, with the saved teacher's scores
    (the teacher job's SAVED_TEACHER_SCORES) and the students' SCORES by the teacher's label, paired by teacher seed
    against the teacher sweep's baseline arm (LoT's teacher-only). None when no trial used such a teacher."""

    runs = trial_runs(students)
    if not len(runs) or "tags.teachsweep.teacher" not in runs:
        return None
    runs = runs[(runs["status"] == "FINISHED") & runs["tags.teachsweep.teacher"].fillna("").str.startswith("sweep:")]
    names = {parse_sweep(ref, "teacher")[0] for ref in runs["tags.teachsweep.teacher"]}
    if len(names) != 1:
        return None
    (name,) = names
    if "tags.teachsweep.teacher_run" in runs and runs["tags.teachsweep.teacher_run"].notna().all():
        found = teachers_from_their_runs(students.tracking_uri, set(runs["tags.teachsweep.teacher_run"]))
    else:  # students that did not record their teachers' runs: read the teachers' sweep
        found = teachers_from_their_sweep(name, students)
    if found is None:
        return None
    teachers, reference = found
    variants = list(students.spec.variants)
    student_scores = JOBS[students.spec.job].scores
    rows = [
        {
            "teacher": parse_sweep(run["tags.teachsweep.teacher"], "teacher")[1],
            "variant": variant_of(run["tags.teachsweep.label"], variants) or run["tags.teachsweep.label"],
            "scores": {
                m: float(run[f"metrics.{m}"])
                for m in student_scores
                if f"metrics.{m}" in run and run[f"metrics.{m}"] == run[f"metrics.{m}"]
            },
        }
        for _, run in runs.iterrows()
    ]
    return name, by_teacher(teachers, rows, reference or "")


TeacherTable = tuple[dict[str, dict[str, Any]], str | None]  # teacher trial id -> label, seed, scores; the baseline


def teachers_from_their_runs(tracking_uri: str, run_ids: set[str]) -> TeacherTable | None:
    """The teachers as the students recorded them (`teachsweep.teacher_run`): their own MLflow runs, read by id,
    whatever became of the sweep that trained them. None when a run is gone from the store."""
    from mlflow.exceptions import MlflowException

    client = RetryingClient(tracking_uri)
    found = []
    for run_id in sorted(run_ids):
        try:
            run = client.get_run(run_id)
        except MlflowException:
            return None
        tags, params = run.data.tags, run.data.params
        if "seed" not in params and len(yaml_list(params.get("seeds"))) != 1:
            continue  # ran several seeds in one trial: no per-seed teacher to pair
        seed = params["seed"] if "seed" in params else yaml_list(params["seeds"])[0]
        row = {"label": tags["teachsweep.label"], "params": {"arm": tags.get("teachsweep.arm") or None}}
        found.append((tags["teachsweep.trial_id"], row, int(seed), run.data.metrics, JOBS[tags["teachsweep.job"]]))
    return teacher_table(found)


def teacher_table(found: list[tuple[str, dict[str, Any], int, dict[str, float], Any]]) -> TeacherTable:
    """{teacher trial id: label, seed, saved-teacher scores} and the baseline teacher's label, from (trial id,
    row with label and params, seed, metrics, the teacher's job) per teacher."""
    teachers, reference = {}, None
    for trial_id, row, seed, metrics, job in found:
        scores = {m: metrics[m] for m in job.saved_teacher_scores if m in metrics}
        teachers[trial_id] = {"label": row["label"], "seed": seed, "scores": scores}
        if reference is None and is_baseline(row, job):
            reference = row["label"]
    return teachers, reference


def yaml_list(text: str | None) -> list:

    value = yaml.safe_load(text) if text else None
    return value if isinstance(value, list) else []


def teachers_from_their_sweep(name: str, students: Sweep) -> TeacherTable | None:
    """The teachers of sweep `name`, read from its directory (or, moved away, from its runs in the students'
    store); None when neither is left."""

    try:
        teacher_sweep = open_sweep(name, students.directory.parent)
    except SpecError:  # its directory moved away; its runs are in the store the students' teachers came from
        try:
            teacher_sweep = open_logged_sweep(name, students.tracking_uri, students.directory.parent)
        except Exception:  # its runs are gone too: the students still read, without the by-teacher table
            return None
    job, default_seed = JOBS[teacher_sweep.spec.job], teacher_sweep.spec.seeds[0]
    found = [
        (str(row["trial_id"]), row, int(row["params"].get("seed", default_seed)), row["metrics"], job)
        for row in trial_rows(teacher_sweep, merge_seeds=False)
        if not any("@seed" in k for k in row["metrics"])
    ]  # several seeds in one trial: no per-seed teacher
    return teacher_table(found)


def point_of(row: dict[str, Any], metric: str) -> float | None:
    """A trial's value of `metric`: the mean over its seeds when it ran several."""

    seeds = per_seed(row["metrics"], metric)
    return statistics.fmean(seeds.values()) if seeds else row["metrics"].get(metric)


def with_its_interval(row: dict[str, Any], metric: str) -> str:
    """'0.73 [0.6771, 0.7771] (Wilson score 95% over 300 validation examples)', or the value and '(no interval)'."""

    own = interval_of(row["metrics"], metric)
    if own is None:
        return f"{point_of(row, metric):.4g} (no interval)"
    return f"{own.point:.4g} {interval_text(own.low, own.high)} ({own.label})"


def noise_of(difference: dict[str, Any]) -> str:
    return "within noise" if difference["low"] <= 0 <= difference["high"] else "distinguishable"


def baselines_of(best: dict[str, Any], rows: list[dict[str, Any]], job) -> list[tuple[str, dict[str, Any] | None]]:
    """(budget, baseline arm or None where none finished) the best trial is judged against: the job's own matching
    (LoT: the teacher-only arm of its config at each budget), else the baseline arms of its variant and the job's
    reference arm (SMaT's `none`)."""
    if job.matches_baselines:
        return job.baselines(best, rows)
    variant = best["params"].get("variant", "")
    return [
        ("", r)
        for r in rows
        if r is not best
        and is_baseline(r, job)
        and (r["params"].get("variant", "") == variant or r["label"] == job.reference_arm)
    ]


def selection_words(best: dict[str, Any], metric: str, job) -> str:
    """Where the trial was picked: the job's words for its objective's split, else the split in the metric's name."""

    split = split_of(metric)
    where = job.selection_split(best["params"]) or (f"the {split} split" if split else None)
    return f"; picked on {where}" if where else ""


def versus_baselines(
    best: dict[str, Any], baselines: list[tuple[str, dict[str, Any] | None]], metric: str
) -> list[str]:
    """The best against each baseline arm on the objective."""

    lines = []
    for budget, base in baselines:
        if base is None:
            lines.append(f"vs its baseline arm at {budget}: none finished that stands for this trial; not compared")
        elif point_of(base, metric) is None:
            lines.append(f"vs {base['label']}: it reported no {metric}")
        elif (c := compare_to_best(best, base, metric)) is None:
            lines.append(f"vs {base['label']}: {point_of(best, metric) - point_of(base, metric):+.4g} (no interval)")
        else:
            lines.append(
                f"vs {base['label']}: {c['diff']:+.4g} [{c['low']:+.4g}, {c['high']:+.4g}] ({noise_of(c)}; "
                f"{c['method']})"
            )
    return lines


def held_out(
    best: dict[str, Any], baselines: list[tuple[str, dict[str, Any] | None]], metric: str, scores: list[str]
) -> list[str]:
    """The best and each baseline on the job's first score of record the best reports, which played no part in
    picking it (the validation score of the best of many trials is biased upwards: the winner's curse)."""

    # the score of the model a trial keeps (its best-validation epoch) before the last epoch's
    kept_first = [s for s in scores if s.endswith("_at_best_val")] + [
        s for s in scores if not s.endswith("_at_best_val")
    ]
    score = next((s for s in kept_first if point_of(best, s) is not None), None)
    if score is None:
        return [f"held out: the best reported none of the scores of record ({', '.join(scores)})"] if scores else []
    if score == metric:
        return [f"{metric} is also the score of record: nothing held out checks the pick"]
    lines = [f"held out, not used to pick the trial: {score}", f"  best {with_its_interval(best, score)}"]
    for _, base in baselines:
        value = None if base is None else point_of(base, score)
        if value is None:
            continue
        c = compare_to_best(best, base, score)
        versus = (
            f"{c['diff']:+.4g} [{c['low']:+.4g}, {c['high']:+.4g}] ({noise_of(c)})"
            if c
            else f"{point_of(best, score) - value:+.4g} (no interval)"
        )
        lines.append(f"  vs {base['label']} {value:.4g}: {versus}")
        if c:
            lines.append(f"    (difference: {c['method']})")
    return lines


def verdict_candidates(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished trials that reported the first objective and are not baseline arms (all of them when every
    trial is one): those the verdict picks its best from."""

    metric, job = spec.metric_names[0], JOBS[spec.job]
    done = [r for r in rows if r["status"] == "OK" and point_of(r, metric) is not None]
    return [r for r in done if not is_baseline(r, job)] or done


def verdict_pick(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial the verdict names (and `best`, `status` show): THE best-trial rule over `verdict_candidates`."""
    candidates = verdict_candidates(spec, rows)
    metric, mode = spec.metric_names[0], spec.mode_names[0]
    return pick_best([(point_of(r, metric), str(r["trial_id"]), r) for r in candidates], mode)


def wrap_lines(lines: list[str], width: int = 100, indent: str = "  ") -> list[str]:
    """Lines (the verdict's sentences) cut at spaces to fit `width` columns; a continuation is indented past its
    line's own indentation, so each sentence still reads as one item. A word longer than the width stays whole."""

    out = []
    for line in lines:
        lead = line[: len(line) - len(line.lstrip())]
        out += textwrap.wrap(
            line, width, subsequent_indent=lead + indent, break_long_words=False, break_on_hyphens=False
        ) or [""]
    return out


def verdict(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    """What the sweep found on its first objective, and how sure it is: the best trial with its interval and the
    split that picked it, how many trials are within noise of it (their difference to the best has a 95% interval
    containing 0), the best against each baseline arm, and then the same on the job's held-out score of record.
    Plain sentences, for the end of `run`, `best` and the report."""

    metric, mode = spec.metric_names[0], spec.mode_names[0]
    job = JOBS[spec.job]
    best = verdict_pick(spec, rows)
    if best is None:
        return [f"no finished trial reported {metric}"]
    candidates = verdict_candidates(spec, rows)
    lines = [
        f"best on {metric} ({mode}{selection_words(best, metric, job)}): trial {best['trial_id']} "
        f"[{best['label']}] {with_its_interval(best, metric)}"
    ]
    variant = best["params"].get("variant", "")
    others = [r for r in candidates if r is not best and r["params"].get("variant", "") == variant]
    if others:
        compared = [(r, compare_to_best(best, r, metric)) for r in others]
        known = [(r, c) for r, c in compared if c is not None]
        close = [r for r, c in known if c["low"] <= 0 <= c["high"]]
        if not known:
            lines.append(f"{len(others)} other trial(s): no interval to tell them apart from the best")
        elif close:
            lines.append(
                f"{len(close)} of {len(others)} other trials are within noise of the best (their difference "
                f"to it has a 95% interval containing 0: {known[0][1]['method']}); the best is not a clear "
                "winner"
            )
        else:
            lines.append(f"the best is distinguishable from all {len(known)} other trials ({known[0][1]['method']})")
    baselines = baselines_of(best, rows, job)
    return lines + versus_baselines(best, baselines, metric) + held_out(best, baselines, metric, job.scores)
