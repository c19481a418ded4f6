"""Reading a sweep back: its spec, MLflow runs and Optuna study, for the CLI (status, best, export, list) and
for notebooks. Everything is found from the sweep's name and its results directory."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teachsweep.spec import SpecError, SweepSpec, parse_spec

DEFAULT_RESULTS = "teachsweep-results"


@dataclass
class Sweep:
    name: str
    directory: Path
    spec: SweepSpec
    spec_text: str
    tracking_uri: str
    parent_run_id: str | None

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.directory / 'optuna.db'}"

    @property
    def planned_trials(self) -> int:
        from teachsweep.plan import fixed_trials

        return len(fixed_trials(self.spec)) + (self.spec.num_samples if self.spec.space else 0)


def open_sweep(name: str, results_dir: str | Path = DEFAULT_RESULTS) -> Sweep:
    directory = Path(results_dir).expanduser().resolve() / name
    spec_file = directory / "spec.yaml"
    if not spec_file.is_file():
        raise SpecError(f"no sweep named '{name}' in {directory.parent}")
    text = spec_file.read_text()
    spec = parse_spec(text, where=f"{spec_file}: ")
    uri_file, parent_file = directory / "tracking_uri", directory / "mlflow_parent_run_id"
    uri = uri_file.read_text().strip() if uri_file.exists() else f"sqlite:///{directory.parent}/mlflow.db"
    parent = parent_file.read_text().strip() if parent_file.exists() else latest_parent_run(uri, spec)
    return Sweep(name, directory, spec, text, uri, parent)


def latest_parent_run(uri: str, spec: SweepSpec) -> str | None:
    """The newest parent run tagged with the sweep's name (for results directories without the id file)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
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


def list_sweeps(results_dir: str | Path = DEFAULT_RESULTS) -> list[str]:
    root = Path(results_dir).expanduser()
    return sorted(p.parent.name for p in root.glob("*/spec.yaml")) if root.is_dir() else []


def trial_runs(sweep: Sweep):
    """A DataFrame of the sweep's trial runs (run_id, status, start_time, params.*, metrics.*, tags.*), one row
    per trial, like `mlflow.search_runs` gives, but through a client: no process-wide tracking URI is set (a
    notebook or a driver that reads one sweep must not redirect the next sweep's logging)."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.spec.experiment or sweep.name)
    if sweep.parent_run_id is None or experiment is None:
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
        }  # fmt: skip
        for run in runs
    ]
    return pd.DataFrame(rows)


def teacher_runs(sweep: Sweep) -> dict[str, str]:
    """{trial id: MLflow run id} of the sweep's finished trials that saved a teacher (`model.pt`; for a trial that
    ran several seeds, its first seed's run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.spec.experiment or sweep.name)
    if experiment is None:
        return {}
    query = f"tags.`teachsweep.sweep` = '{sweep.name}' and tags.`teachsweep.teacher_artifact` = 'model.pt'"
    runs = client.search_runs([experiment.experiment_id], filter_string=query, max_results=50_000,
                              order_by=["attributes.start_time ASC"])  # fmt: skip
    out: dict[str, str] = {}
    for run in runs:
        trial = run.data.tags.get("teachsweep.trial_id")
        if run.info.status == "FINISHED" and trial and trial not in out:
            out[trial] = run.info.run_id
    return out


def status(sweep: Sweep) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    runs = trial_runs(sweep)
    counts = runs["status"].value_counts().to_dict() if len(runs) else {}
    parent = MlflowClient(sweep.tracking_uri).get_run(sweep.parent_run_id) if sweep.parent_run_id else None
    start = parent.info.start_time / 1000 if parent else time.time()
    end = parent.info.end_time / 1000 if parent and parent.info.status != "RUNNING" and parent.info.end_time else None
    return {
        "planned": sweep.planned_trials,
        "finished": counts.get("FINISHED", 0),
        "running": counts.get("RUNNING", 0),
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
    """The best of the runner's trial rows (single objective)."""
    metric, mode = spec.metric_names[0], spec.mode_names[0]
    done = [(r["metrics"][metric], r["trial_id"], r) for r in rows if r["status"] == "OK" and metric in r["metrics"]]
    best = pick_best(done, mode)
    if best is None:
        return []
    return [{"params": best["params"], "values": {metric: best["metrics"][metric]}, "trial_id": best["trial_id"],
             "label": best["label"], "mlflow_run_id": best["mlflow_run_id"]}]  # fmt: skip


def pareto_front(spec: SweepSpec, storage_url: str, runs=None) -> list[dict[str, Any]]:
    """Several objectives: the Pareto front of the sweep's Optuna study (searched trials), each matched to its
    MLflow run by parameters when `runs` (finished trial runs) are given."""
    import optuna

    try:
        study = optuna.load_study(study_name=spec.name, storage=storage_url)
    except KeyError:
        return []
    front = []
    for trial in study.best_trials:
        entry = {"params": trial.params, "values": dict(zip(spec.metric_names, trial.values, strict=True)),
                 "optuna_trial": trial.number}  # fmt: skip
        if runs is not None:
            entry["mlflow_run_id"] = match_run(runs, trial.params)
        front.append(entry)
    return front


def best_trials(sweep: Sweep, runs=None) -> list[dict[str, Any]]:
    """Single objective: the best finished trial (`pick_best` over the MLflow runs). Several: the Pareto front."""
    runs = trial_runs(sweep) if runs is None else runs
    spec = sweep.spec
    if not len(runs):
        return []
    finished = runs[runs["status"] == "FINISHED"]
    if len(spec.objectives) > 1 and spec.space:
        return pareto_front(spec, sweep.optuna_url, finished)
    column, mode = f"metrics.{spec.metric_names[0]}", spec.mode_names[0]
    if column not in finished:
        return []
    candidates = [(float(row[column]), str(row.get("tags.teachsweep.trial_id")), row) for _, row in finished.iterrows()]
    row = pick_best(candidates, mode)
    if row is None:
        return []
    return [{"params": params_of(row, spec), "values": {spec.metric_names[0]: float(row[column])},
             "mlflow_run_id": row["run_id"], "trial_id": row.get("tags.teachsweep.trial_id")}]  # fmt: skip


def params_of(row, spec: SweepSpec) -> dict[str, Any]:
    """The searched (or, for grids, the overlaid) parameters of a run row, typed back from MLflow's strings."""
    import yaml

    keys = list(spec.space) or sorted({k for v in spec.variants.values() for k in v} | {"arm", "seed"})
    out = {}
    for key in keys:
        value = row.get(f"params.{key}")
        if value is not None and value == value:  # not NaN
            out[key] = yaml.safe_load(value) if value not in ("None",) else None
    return out


def match_run(runs, params: dict[str, Any]) -> str | None:
    for _, row in runs.iterrows():
        if all(str(row.get(f"params.{k}")) == str(v) for k, v in params.items()):
            return row["run_id"]
    return None


def full_config(sweep: Sweep, run_id: str) -> dict[str, Any]:
    """The complete job config a trial ran, read back from its MLflow params and typed by the job's model."""
    import yaml
    from mlflow.tracking import MlflowClient

    from teachsweep.jobs import JOBS

    params = MlflowClient(sweep.tracking_uri).get_run(run_id).data.params
    fields = JOBS[sweep.spec.job].config_class.model_fields
    config = {k: yaml.safe_load(v) if v != "None" else None for k, v in params.items() if k in fields}
    return JOBS[sweep.spec.job].config_class.model_validate(config).model_dump()


def variant_of(label: str, variants: list[str]) -> str:
    """The variant a trial label starts with ('lm' of 'lm-teacher_only-N5'); '' for searched trials."""
    return max((v for v in variants if label == v or label.startswith(f"{v}-")), key=len, default="")


def trial_rows(sweep: Sweep, runs=None, merge_seeds: bool = True) -> list[dict[str, Any]]:
    """The sweep's finished trials as the runner's rows ({trial_id, label, params, status, metrics}), read from
    MLflow: params typed back, `variant` from the label, per-seed values as `metric@seedN` (from the seed runs of
    a trial that ran several seeds; a grid's one-seed trials merged into one row per label unless not
    `merge_seeds`)."""
    import yaml
    from mlflow.tracking import MlflowClient

    from teachsweep.metrics import merge_seed_trials

    runs = trial_runs(sweep) if runs is None else runs
    if not len(runs):
        return []
    variants = list(sweep.spec.variants)
    client = MlflowClient(sweep.tracking_uri)
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
        rows.append({"trial_id": run["tags.teachsweep.trial_id"], "label": run["tags.teachsweep.label"],
                     "params": params, "status": "OK", "metrics": metrics | seed_runs.get(run["run_id"], {}),
                     "mlflow_run_id": run["run_id"]})  # fmt: skip
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
    from teachsweep.jobs import JOBS
    from teachsweep.metrics import by_teacher
    from teachsweep.references import parse_sweep

    runs = trial_runs(students)
    if not len(runs) or "tags.teachsweep.teacher" not in runs:
        return None
    runs = runs[(runs["status"] == "FINISHED") & runs["tags.teachsweep.teacher"].fillna("").str.startswith("sweep:")]
    names = {parse_sweep(ref, "teacher")[0] for ref in runs["tags.teachsweep.teacher"]}
    if len(names) != 1:
        return None
    (name,) = names
    teacher_sweep = open_sweep(name, students.directory.parent)
    teacher_job = JOBS[teacher_sweep.spec.job]
    teachers, reference = {}, None
    for row in trial_rows(teacher_sweep, merge_seeds=False):
        if any("@seed" in k for k in row["metrics"]):  # ran several seeds in one trial: no per-seed teacher to pair
            continue
        seed = row["params"].get("seed", teacher_sweep.spec.seeds[0] if teacher_sweep.spec.seeds else 0)
        scores = {m: row["metrics"][m] for m in teacher_job.saved_teacher_scores if m in row["metrics"]}
        teachers[str(row["trial_id"])] = {"label": row["label"], "seed": int(seed), "scores": scores}
        if is_baseline(row, teacher_job) and reference is None:
            reference = row["label"]
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
        }  # fmt: skip
        for _, run in runs.iterrows()
    ]
    return name, by_teacher(teachers, rows, reference or "")


def verdict(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    """What the sweep found on its first objective, and how sure it is: the best trial with its interval, how many
    trials are within noise of it (their difference to the best has a 95% interval containing 0), and the best
    against each baseline arm. Plain sentences, for the end of `run`, `best` and the report."""
    from teachsweep.jobs import JOBS
    from teachsweep.metrics import compare_to_best, interval_of, per_seed

    metric, mode = spec.metric_names[0], spec.mode_names[0]
    job = JOBS[spec.job]

    def point(row) -> float | None:
        seeds = per_seed(row["metrics"], metric)
        return statistics.fmean(seeds.values()) if seeds else row["metrics"].get(metric)

    done = [r for r in rows if r["status"] == "OK" and point(r) is not None]
    if not done:
        return [f"no finished trial reported {metric}"]

    candidates = [r for r in done if not is_baseline(r, job)] or done
    best = pick_best([(point(r), str(r["trial_id"]), r) for r in candidates], mode)
    own = interval_of(best["metrics"], metric)
    shown = f"{own[0]:.4g} ({own[1]:.4g}, {own[2]:.4g}; {own[3]})" if own else f"{point(best):.4g} (no interval)"
    lines = [f"best on {metric} ({mode}): trial {best['trial_id']} [{best['label']}] {shown}"]
    variant = best["params"].get("variant", "")
    others = [r for r in candidates if r is not best and r["params"].get("variant", "") == variant]
    if others:
        compared = [(r, compare_to_best(best, r, metric)) for r in others]
        known = [(r, c) for r, c in compared if c is not None]
        close = [r for r, c in known if c["low"] <= 0 <= c["high"]]
        if not known:
            lines.append(f"{len(others)} other trial(s): no interval to tell them apart from the best")
        elif close:
            lines.append(f"{len(close)} of {len(others)} other trials are within noise of the best (their difference "
                         f"to it has a 95% interval containing 0: {known[0][1]['method']}); the best is not a clear "
                         "winner")  # fmt: skip
        else:
            lines.append(f"the best is distinguishable from all {len(known)} other trials ({known[0][1]['method']})")
    same_variant = [r for r in done if r["params"].get("variant", "") == variant]
    for base in [r for r in same_variant if is_baseline(r, job) and r is not best]:
        c = compare_to_best(best, base, metric)
        if c is None:
            lines.append(f"vs {base['label']}: {point(best) - point(base):+.4g} (no interval)")
            continue
        noise = "within noise" if c["low"] <= 0 <= c["high"] else "distinguishable"
        lines.append(f"vs {base['label']}: {c['diff']:+.4g} [{c['low']:+.4g}, {c['high']:+.4g}] ({noise}; "
                     f"{c['method']})")  # fmt: skip
    return lines


def ui_urls(sweep: Sweep, host: str = "127.0.0.1", port: int = 5000) -> dict[str, str]:
    """The pages a sweep's user needs in the MLflow UI (on `port`) and optuna-dashboard (on port + 1): the trials
    in the model-training view, flat (the parent run filtered out) and ordered by the first objective; the parent
    run's artifacts (the report); the study."""
    from urllib.parse import quote, urlencode

    import optuna
    from mlflow.tracking import MlflowClient

    spec = sweep.spec
    experiment = MlflowClient(sweep.tracking_uri).get_experiment_by_name(spec.experiment or spec.name)
    base = f"http://{host}:{port}/#/experiments/{experiment.experiment_id if experiment else ''}"
    query = urlencode({
        "workflowType": "machine_learning",
        "searchFilter": f"tags.`teachsweep.sweep` = '{spec.name}' and tags.`teachsweep.role` = 'trial'",
        "orderByKey": f"metrics.`{spec.metric_names[0]}`",
        "orderByAsc": "true" if spec.mode_names[0] == "min" else "false",
    }, quote_via=quote)  # fmt: skip
    urls = {"trials": f"{base}/runs?{query}"}
    if sweep.parent_run_id:
        urls["report"] = f"{base}/runs/{sweep.parent_run_id}/artifacts/report.html"
    if spec.space and (sweep.directory / "optuna.db").exists():
        try:
            storage = optuna.storages.RDBStorage(sweep.optuna_url)
            urls["study"] = f"http://{host}:{port + 1}/dashboard/studies/{storage.get_study_id_from_name(spec.name)}"
        except KeyError:
            pass
    return urls
