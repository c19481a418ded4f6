"""Teacher references in job configs, checked before a sweep creates anything and resolved for each trial.

A job declares which of its config fields hold a teacher (`JobSpec.teacher_fields`); each may be

    {task: ..., model: ...}   a teacher config: trained once into the teacher registry on first use
    <directory>               a checkpoint directory: model.pt (a state_dict) and config.json (its teacher config)
    mlflow:<run_id>           the model.pt and config.json an MLflow run logged, in the sweep's tracking store
    sweep:<name>/<selector>   the teachers an earlier sweep (in the same results directory) trained: `best` (its
                              best trial by its own objective), a trial id, or `each` (one teacher per finished
                              trial, fixed arms included: the planner fans a trial out per teacher)

The sweep layer resolves `mlflow:` references to a local directory (`materialize`) so that jobs never talk to
MLflow, and checks every reference up front (`check`): a run, directory or file that does not exist is a
one-line error naming the field, before any trial, run or study exists. How a reference is written, and the error
naming its field, are teacher_refs.py: the results reader, which this module reads earlier sweeps with, parses
the references its runs recorded with them."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from teachsweep import layout, tracking
from teachsweep.results import sweep_teachers
from teachsweep.teacher_refs import CHECKPOINT_FILES, MLFLOW, SWEEP, TeacherReferenceError, parse_sweep


def validate_teacher_config(config: Any) -> None:
    from teachsweep.jobs.teacher import TeacherConfig  # heavy (torch): only teachers given as configs or directories

    TeacherConfig.model_validate(config)


def check(
    value: Any, field: str, tracking_uri: str, results_dir: str | Path = ".", pending: set[str] = frozenset()
) -> None:
    """Refuse a reference that could not be resolved (reads only; creates no store, run or file). References to
    `pending` sweeps (earlier stages of a pipeline that have not run yet) are checked when those have run."""
    if isinstance(value, str) and value.startswith(SWEEP):
        if parse_sweep(value, field)[0] in pending:
            return
        for run_id in sweep_teachers(value, field, results_dir).values():
            check_mlflow_run(run_id, field, tracking_uri)
        return
    if isinstance(value, dict):
        try:
            validate_teacher_config(value)
        except ValueError as error:
            raise TeacherReferenceError(f"{field}: {str(error).splitlines()[-1].strip()}") from None
        return
    if not isinstance(value, str):
        raise TeacherReferenceError(f"{field}: a teacher config, a checkpoint directory or mlflow:<run_id>")
    if value.startswith(MLFLOW):
        check_mlflow_run(value.removeprefix(MLFLOW), field, tracking_uri)
        return
    directory = Path(value).expanduser()
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if not directory.is_dir() or missing:
        raise TeacherReferenceError(
            f"{field}: no teacher checkpoint at {directory} (needs {', '.join(CHECKPOINT_FILES)})"
        )
    try:
        validate_teacher_config(json.loads((directory / "config.json").read_text()))
    except ValueError as error:
        raise TeacherReferenceError(f"{field}: {directory / 'config.json'} is not a teacher config: {error}") from None


def check_mlflow_run(run_id: str, field: str, tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise TeacherReferenceError(f"{field}: MLflow run {run_id} not found (no tracking store at {tracking_uri})")
    from mlflow.exceptions import MlflowException  # heavy: MLflow, only for an mlflow: reference

    client = tracking.RetryingClient(tracking_uri)
    try:
        client.get_run(run_id)
        logged = {artifact.path for artifact in client.list_artifacts(run_id)}
    except MlflowException:
        raise TeacherReferenceError(f"{field}: MLflow run {run_id} not found in {tracking_uri}") from None
    missing = [name for name in CHECKPOINT_FILES if name not in logged]
    if missing:
        raise TeacherReferenceError(f"{field}: MLflow run {run_id} logged no teacher ({', '.join(missing)} missing)")


def expand(
    value: Any, field: str, results_dir: str | Path, pending: set[str] = frozenset()
) -> list[tuple[str | None, Any]]:
    """The teachers one reference stands for, as (trial id of the earlier sweep or None, reference a trial can
    materialize): `sweep:` references become `mlflow:<run_id>` (several for `each`), others stay as they are, and
    so do references to `pending` sweeps (not run yet)."""
    if not (isinstance(value, str) and value.startswith(SWEEP)) or parse_sweep(value, field)[0] in pending:
        return [(None, value)]
    return [(trial, f"{MLFLOW}{run}") for trial, run in sorted(sweep_teachers(value, field, results_dir).items())]


def materialize(value: Any, tracking_uri: str) -> Any:
    """A reference a job can load without MLflow: `mlflow:<run>` becomes the local directory its checkpoint was
    downloaded to (in the cache, once per run); configs and directories are returned unchanged."""
    if not (isinstance(value, str) and value.startswith(MLFLOW)):
        return value
    run_id = value.removeprefix(MLFLOW)
    target = layout.cache_dir() / "teachers" / f"mlflow-{run_id}"
    if all((target / name).is_file() for name in CHECKPOINT_FILES):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # concurrent trials: each downloads into its own directory, and the first complete one is kept
    staging = Path(tempfile.mkdtemp(prefix=f".mlflow-{run_id}-", dir=target.parent))
    client = tracking.RetryingClient(tracking_uri)
    for name in CHECKPOINT_FILES:
        client.download_artifacts(run_id, name, str(staging))
    try:
        staging.rename(target)
    except OSError:  # another trial finished first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def resolve_config(config: dict[str, Any], fields: tuple[str, ...], tracking_uri: str) -> dict[str, Any]:
    """`config` with each teacher field materialized."""
    return config | {f: materialize(config[f], tracking_uri) for f in fields if f in config}
