"""Which trial is best: one rule for the runner, the CLI, the report and `sweep:<name>/best` (functions of the
trials' rows, which results.py reads), and with several objectives the Pareto front of the sweep's study."""

from __future__ import annotations

import statistics
from typing import Any

from teachsweep.jobs import JOBS
from teachsweep.layout import missing_sqlite_file
from teachsweep.metrics import per_seed
from teachsweep.spec import SweepSpec


def pick_best(candidates: list[tuple[float, str, Any]], mode: str) -> Any:
    """THE best-trial rule, for the runner and the CLI alike: among finished trials that reported the objective,
    the highest (mode max) or lowest final value; ties go to the smallest trial id. `candidates` are
    (value, trial id, payload); returns the payload, or None."""
    finite = [c for c in candidates if c[0] == c[0]]  # NaN never wins
    if not finite:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(finite, key=lambda c: (sign * c[0], c[1]))[2]


def is_baseline(row: dict[str, Any], job) -> bool:
    """A trial of the job's fixed comparison arms (an `arm` other than its DEFAULT_ARM, LoT's teacher-only) or of
    its REFERENCE_ARM variant (SMaT's `none`): known through the job protocol only."""
    arm = row["params"].get("arm")
    return (job.default_arm is not None and arm not in (None, job.default_arm)) or (
        job.reference_arm is not None and row["label"] == job.reference_arm
    )


def point_of(row: dict[str, Any], metric: str) -> float | None:
    """A trial's value of `metric`: the mean over its seeds when it ran several."""

    seeds = per_seed(row["metrics"], metric)
    return statistics.fmean(seeds.values()) if seeds else row["metrics"].get(metric)


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


def match_run(runs, params: dict[str, Any]) -> str | None:
    for _, row in runs.iterrows():
        if all(str(row.get(f"params.{k}")) == str(v) for k, v in params.items()):
            return row["run_id"]
    return None
