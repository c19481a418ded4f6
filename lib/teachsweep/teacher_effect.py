"""Students by the arm of their teacher: for a sweep whose trials took their teachers from an earlier sweep, the
saved teachers' scores and the students' scores paired by teacher seed against the baseline teacher."""

from __future__ import annotations

from typing import Any

import yaml

from teachsweep.jobs import JOBS
from teachsweep.metrics import by_teacher
from teachsweep.ranking import is_baseline
from teachsweep.results import Sweep, open_logged_sweep, open_sweep, trial_rows, trial_runs, variant_of
from teachsweep.spec import SpecError
from teachsweep.teacher_refs import parse_sweep
from teachsweep.tracking import RetryingClient


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
    from mlflow.exceptions import MlflowException  # heavy: MLflow loads when a store is read, not at import

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
