"""Run a validated sweep: one Tune experiment, one Optuna study, one MLflow parent run, all keyed by the sweep's
name, so that running the same spec again resumes it instead of starting over.

The path of one sweep, one module a step:

    spec.py       YAML -> SweepSpec, validated (pure: reads no other sweep, run or store)
    plan.py       SweepSpec -> the fixed trials (variants, the job's fixed arms, seeds), expanded once a run
    preflight.py  what is refused before anything exists: the plan's trials' checks, teacher references, stores
    search.py     fixed trials first, then Optuna ask/tell on the sweep's study
    trial.py      the Tune trainable: one config, its seeds, one MLflow child run; the job in-process or DDP
    jobs/*.py     train(config, reporter) -> metrics, knowing nothing of Ray or MLflow
    results.py    one reading of a finished sweep: rows, seed summaries, comparisons; ranking.py, its best trial

This module ties them together: preflight, the stores, the Tune run, and what is logged at the end."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# A grid may mix domains whose trials report different metrics (accuracy for images, perplexity for language
# models); rows_from_tune() flags searched trials that never reported their objective instead.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from teachsweep import cluster, preflight, references, report, tracking, tune_state
from teachsweep.early_stopping import StudyASHA
from teachsweep.jobs import JOBS
from teachsweep.launch import Placement
from teachsweep.layout import SweepDir
from teachsweep.metrics import PAIRED_METHOD, merge_seed_trials, seed_summaries
from teachsweep.plan import OPTUNA_TRIAL, PACK, Plan, member_states
from teachsweep.ranking import (
    best_of_rows,
    pareto_front,
)
from teachsweep.results import open_sweep
from teachsweep.search import (
    complete_finished_trials,
    fail_interrupted_trials,
    make_searcher,
    requeue_lost_trials,
)
from teachsweep.spec import SpecError, SweepSpec
from teachsweep.trial import SweepRecords, TrialContext, run_trial, trial_label


@dataclass
class SweepOutcome:
    spec: SweepSpec
    paths: SweepDir
    tracking_uri: str
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: list[dict[str, Any]] = field(default_factory=list)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    seed_summaries: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    report: Path | None = None  # report.html (also an artifact of the parent run)


def paths_for(spec: SweepSpec) -> SweepDir:
    return SweepDir.of(spec.name, spec.results_dir)


def init_ray(total_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        num_cpus=None if os.environ.get("RAY_ADDRESS") else total_cpus,
        include_dashboard=False,
        log_to_driver=os.environ.get("TEACHSWEEP_TRIAL_LOGS", "0") == "1",
        logging_level="ERROR",
    )


# ---------------------------------------------------------------------------------------------- running


def quiet_libraries() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def run_sweep(
    spec: SweepSpec,
    spec_text: str,
    callbacks: list | None = None,
    pipeline_run_id: str | None = None,
    where: str = "",
) -> SweepOutcome:
    """Run or resume one sweep after its preflight (refusals prefixed with `where`, the spec file); a pipeline's
    stage nests its parent run under the pipeline's run."""
    quiet_libraries()
    paths = paths_for(spec)
    plan = preflight.check_spec(spec, where)  # the plan it checked: expanded once, for the whole run
    # A sweep some driver of this version ran has its lock file: taken before anything else, so a second driver
    # is refused at once; a new sweep's is created with its directory, and its stores checked again under it.
    lock = hold_driver_lock(paths, spec.name, where) if paths.driver_lock.is_file() else None
    try:
        uri = preflight.check_stores(spec, paths.root, paths.fingerprint, started=holds_results(paths), where=where)
        start = time.time()
        init_ray()
        preflight.check_trial_fits(spec)  # these may refuse the spec: before anything is created
        cluster.check_cluster_stores(spec, paths.root, uri)
        concurrency = cluster.concurrency_for(spec, plan.count)
        print(concurrency.line(spec.name), flush=True)

        try:
            paths.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a path the access check allowed but the file system refuses (/proc, a full disk)
            raise SpecError(f"{where}results_dir: cannot create {paths.path} ({error.strerror})") from None
        if lock is None:
            lock = hold_driver_lock(paths, spec.name, where)
            # another driver may have run it between the check above and the lock
            preflight.check_stores(spec, paths.root, paths.fingerprint, started=holds_results(paths), where=where)
        return run_holding_the_lock(spec, spec_text, callbacks, pipeline_run_id, paths, uri, start, plan, concurrency)
    finally:
        if lock is not None:
            lock.close()


def hold_driver_lock(paths: SweepDir, name: str, where: str = ""):
    """The sweep's driver lock (an exclusive `flock` on `driver.lock`, released when the file closes or the
    driver dies, even by SIGKILL): a second driver on a running sweep would ask Optuna twice, log twice and, on
    resume, move checkpoints the running one is writing. Refused in one line, naming the driver that holds it. A
    file system without `flock` (NFS with no lock daemon, Lustre mounted without it) gets a warning and no lock."""

    lock = open(paths.driver_lock, "a+")  # noqa: SIM115 - held until the sweep ends, closed by the caller
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        host = socket.gethostname()
        gone = "" if f" on {host}," in holder else f" (if that host is gone, remove {paths.driver_lock})"
        raise SpecError(
            f"{where}sweep '{name}' is being run by another driver ({holder}){gone}: wait for it to end, or stop it "
            "and run this again"
        ) from None
    except OSError as error:
        print(
            f"warning: cannot lock {paths.driver_lock} ({error.strerror}); a second driver on this sweep would not "
            "be refused",
            file=sys.stderr,
            flush=True,
        )
        return lock
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    lock.flush()
    return lock


def run_holding_the_lock(
    spec: SweepSpec,
    spec_text: str,
    callbacks: list | None,
    pipeline_run_id: str | None,
    paths: SweepDir,
    uri: str,
    start: float,
    plan: Plan,
    concurrency,
) -> SweepOutcome:
    """The rest of `run_sweep`, under the sweep's driver lock: record the spec, run the experiment, record the
    outcome."""

    recorded = json.loads(paths.fingerprint.read_text()) if paths.fingerprint.exists() else None
    if recorded is not None and recorded != spec.fingerprint() and not holds_results(paths):
        start_afresh(paths)
    paths.fingerprint.write_text(json.dumps(spec.fingerprint(), indent=1, sort_keys=True))
    paths.spec_file.write_text(spec_text)
    paths.tracking_uri.write_text(uri)
    paths.planned.write_text(str(plan.count))  # read back without expanding teacher references again

    client = tracking.client_for(uri)
    # A SQLite store keeps artifacts beside it (MLflow's default would be ./mlruns in the current directory).
    artifacts = paths.artifacts.as_uri() if uri.startswith("sqlite:") else None
    experiment_id = tracking.ensure_experiment(client, spec.experiment or spec.name, artifacts)
    parent_params = {
        "job": spec.job,
        "config": spec.config,
        "space": spec.model_dump()["space"],
        "seeds": spec.seeds,
        "num_samples": spec.num_samples,
        "objectives": spec.metric_names,
    }
    known_parent = paths.parent_run.read_text().strip() if paths.parent_run.exists() else None
    stage_tags = {"teachsweep.pipeline": spec.pipeline, "teachsweep.stage": str(spec.stage)} if spec.pipeline else {}
    if pipeline_run_id:
        stage_tags["mlflow.parentRunId"] = pipeline_run_id
    parent_run_id = tracking.start_parent_run(
        client, experiment_id, spec.name, parent_params, spec_text, known_parent, stage_tags
    )
    paths.parent_run.write_text(parent_run_id)

    own_tags = {k: v for k, v in stage_tags.items() if k.startswith("teachsweep.")}
    records = SweepRecords(spec.name, uri, experiment_id, parent_run_id, own_tags, tracking.code_tags())
    resources = spec.resources
    ctx = TrialContext(
        records,
        spec.job,
        searched_config(spec),
        spec.seeds,
        Placement(resources.cpus, resources.gpus, resources.workers, resources.accelerator()),
        train_storage=str(paths.train_runs),
        objective=spec.metric_names[0],
        member_stopping=member_stopping(spec, paths),
    )
    # A multi-worker trial only drives its TorchTrainer, whose workers reserve the CPUs and GPUs themselves
    # (Tune refuses an empty request: the driver takes a token 0.01 CPU).
    single = spec.resources.workers == 1
    trainable = tune.with_resources(
        lambda params: run_trial(params, ctx),
        {"cpu": spec.resources.cpus if single else 0.01, "gpu": spec.resources.gpus if single else 0}
        | (spec.resources.accelerator() if single else {}),
    )
    outcome = SweepOutcome(spec, paths, uri, parent_run_id)
    error: BaseException | None = None
    try:

        def forget_unrecorded_trials(known_trial_ids: set[str]) -> None:
            tracking.drop_orphan_trial_runs(client, experiment_id, parent_run_id, known_trial_ids)

        grid = run_experiment(spec, paths, trainable, callbacks, forget_unrecorded_trials, plan, concurrency.trials)
        if stopped := unwritable_error(spec, paths):  # trials that could not record failed: say why, in one line
            raise stopped
        outcome.trials = rows_from_tune(grid, spec)
        outcome.best = best_of_run(spec, paths, outcome.trials)
        merged = merge_seed_trials(outcome.trials)
        outcome.comparisons = JOBS[spec.job].compare(merged, comparison_metrics(spec))
        log_comparisons(client, parent_run_id, outcome.comparisons)
        if uncompared := JOBS[spec.job].uncompared(merged):  # a missing baseline is recorded, never dropped
            tracking.retry(lambda: client.log_dict(parent_run_id, uncompared, "uncompared.json"))
        outcome.seed_summaries = seed_summaries(
            merged, comparison_metrics(spec), JOBS[spec.job].reference_arm, spec.endpoint_references
        )
        if outcome.seed_summaries:
            tracking.retry(lambda: client.log_dict(parent_run_id, outcome.seed_summaries, "seed_summary.json"))
    except BaseException as err:
        error = err
        if not isinstance(err, ResultsUnwritable) and (stopped := unwritable_error(spec, paths)):
            error = stopped  # the storage is the cause: said in one line
            raise stopped from None
        raise
    finally:
        outcome.seconds = time.time() - start
        if not isinstance(error, ResultsUnwritable):  # else nothing can be recorded: the parent run stays open
            tracking.log_metrics(client, parent_run_id, {"sweep/wall_s": outcome.seconds}, step=0)
            if outcome.best:
                tracking.retry(lambda: client.log_dict(parent_run_id, outcome.best, "best.json"))
            tracking.finish_run(client, parent_run_id, error if not isinstance(error, KeyboardInterrupt) else None)
    outcome.report = write_report(spec)
    return outcome


class ResultsUnwritable(SpecError):
    """The results directory stopped accepting writes in the middle of a sweep."""


def unwritable_error(spec: SweepSpec, paths: SweepDir) -> ResultsUnwritable | None:
    """The error to stop with when the results directory (the sweep's own, and the shared one holding the default
    MLflow store) cannot be written now, or None: a probe file created and removed in each, as SQLite's journal
    and Tune's state need."""
    for directory in (paths.path, paths.root):
        probe = directory / f".probe-{os.getpid()}"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            return ResultsUnwritable(
                f"results directory became unwritable during sweep '{spec.name}' ({directory}: {error.strerror}); "
                f"what happened after that was not recorded: make it writable and run `teachsweep resume {spec.name}`"
            )
    return None


def write_report(spec: SweepSpec) -> Path | None:
    """The sweep's HTML report. Everything it reads is already recorded, so a report that cannot be drawn costs a
    warning, not the sweep (`teachsweep report NAME` draws it again)."""
    try:
        return report.write_report(open_sweep(spec.name, spec.results_dir))[0]
    except Exception as error:  # noqa: BLE001
        print(f"warning: the report of sweep '{spec.name}' was not written: {error}", file=sys.stderr)
        return None


def searched_config(spec: SweepSpec) -> dict[str, Any]:
    """The fixed config searched trials start from, with a `sweep:<name>/best` (or trial id) teacher reference
    resolved now, once, to the MLflow run it names (fixed trials carry their own, from plan.py)."""
    config = dict(spec.config)
    for name in JOBS[spec.job].teacher_fields:
        (_, reference), *rest = references.expand(config.get(name), f"config.{name}", spec.results_dir)
        if name in config and not rest:
            config[name] = reference
    return config


def comparison_metrics(spec: SweepSpec) -> list[str]:
    """Objectives plus the job's held-out scores of record (whichever the trials report)."""
    return list(dict.fromkeys(spec.metric_names + JOBS[spec.job].scores + spec.endpoint_metrics))


def log_comparisons(client, parent_run_id: str, comparisons: list[dict[str, Any]]) -> None:
    """LoT minus teacher-only per variant and metric, as parent-run metrics and a JSON table."""
    if not comparisons:
        return
    tracking.retry(lambda: client.log_dict(parent_run_id, comparisons, "lot_vs_teacher_only.json"))
    flat = {}
    for row in comparisons:
        variant = row["variant"] + "/" if row["variant"] else ""
        prefix = f"compare/{variant}{row['trial']}/{row['budget']}/{row['metric']}"
        flat |= {
            f"{prefix}/{k}": row[k]
            for k in ("diff_mean", "ci_low", "ci_high", "p_value", "lot_mean", "teacher_only_mean")
        }
    tracking.log_metrics(client, parent_run_id, flat, step=0)
    tracking.retry(lambda: client.set_tag(parent_run_id, "compare.interval_method", PAIRED_METHOD))


def member_stopping(spec: SweepSpec, paths: SweepDir) -> StudyASHA | None:
    """A packed search's early stopping, decided for each member by ASHA's rule over the study (early_stopping.py)."""
    if spec.scheduler is None or not spec.packed or not spec.space:
        return None
    return StudyASHA(
        paths.optuna_url,
        spec.name,
        spec.mode_names[0],
        spec.scheduler.grace_period,
        spec.scheduler.reduction_factor,
        scheduler_max_t(spec),
    )


def scheduler_max_t(spec: SweepSpec) -> int:
    return spec.scheduler.max_t or int(spec.config.get("epochs", 3))


def make_scheduler(spec: SweepSpec):
    """ASHA on the first objective, epochs as time; fixed trials (baselines) are never stopped early. A packed
    search stops its members itself (member_stopping): Tune could only stop whole packs."""
    if spec.scheduler is None or spec.packed:
        return None

    class SearchOnlyASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            if "fixed_trial" in trial.config:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            if "fixed_trial" not in trial.config:  # a baseline's scores never enter the searched trials' rungs
                super().on_trial_complete(tune_controller, trial, result)

    return SearchOnlyASHA(
        time_attr="epoch",
        metric=spec.metric_names[0],
        mode=spec.mode_names[0],
        max_t=scheduler_max_t(spec),
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def run_experiment(
    spec: SweepSpec,
    paths: SweepDir,
    trainable,
    callbacks,
    on_restore: Callable[[set[str]], None],
    plan: Plan,
    concurrency: int,
):
    """Run the sweep's Tune experiment, or resume it; `on_restore` gets the ids of the trials Tune recorded."""

    experiment = paths.trials
    if experiment.is_dir():
        for line in [*tune_state.repair(paths), *tune_state.restore_pruned_checkpoints(paths)]:
            print(line, flush=True)
    if tune.Tuner.can_restore(str(experiment)) and paths.started:
        failed = []
        if spec.space and paths.optuna_file.exists():
            failed = fail_interrupted_trials(spec, paths.optuna_url)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
        recorded = tuner.get_results()
        known = {Path(result.path).name for result in recorded}  # trial dirs are named by id
        complete_finished_trials(spec, paths.optuna_url, failed, recorded)
        requeue_lost_trials(spec, paths.optuna_url, failed, known)
        on_restore(known)
        return tuner.fit()
    if experiment.exists():  # a driver that died before Tune recorded any trial: start again from nothing
        shutil.rmtree(experiment)
        shutil.rmtree(paths.tune_backup, ignore_errors=True)
        if spec.space and paths.optuna_file.exists():
            requeue_lost_trials(spec, paths.optuna_url, fail_interrupted_trials(spec, paths.optuna_url), set())
        on_restore(set())
    searcher, total = make_searcher(spec, paths.optuna_url, plan.fixed)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(spec),
            num_samples=total,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=lambda trial: trial.trial_id,
            # One trial process runs trial after trial: imports, data and tokenizer caches are paid once.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="trials",
            storage_path=str(paths.tune),
            verbose=0,
            callbacks=[*(callbacks or []), tune_state.KeepLastGoodState()],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=tune_state.CHECKPOINTS_KEPT),
        ),
    )
    return tuner.fit()


def holds_results(paths: SweepDir) -> bool:
    """Whether the sweep holds any result: Tune saved a snapshot and a trial logged a metric (a sweep stopped
    before, by a crash or Ctrl-C in its first seconds, may start anew with a corrected spec)."""
    if not paths.started or not paths.parent_run.exists() or not paths.tracking_uri.exists():
        return paths.started
    return tracking.any_trial_reported(paths.tracking_uri.read_text().strip(), paths.parent_run.read_text().strip())


def start_afresh(paths: SweepDir) -> None:
    """A sweep whose driver stopped before Tune recorded a trial holds no result, so a corrected spec starts it
    anew: a new parent run (the old one stays in MLflow, failed), a new Optuna study (the old file kept beside it
    as `optuna.<time>.abandoned.db`) and a new Tune experiment."""
    study = paths.optuna_file
    if study.exists():
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
        while (kept := paths.abandoned_study(stamp, n)).exists():
            n += 1
        study.rename(kept)
    paths.parent_run.unlink(missing_ok=True)
    shutil.rmtree(paths.tune, ignore_errors=True)
    print(f"sweep '{paths.name}' never recorded a trial: starting it again with the changed spec", flush=True)


def describe_error(error: BaseException) -> str:
    """The root cause of a trial's failure in one line (Ray wraps it in task errors with tracebacks)."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"[:500]


def rows_from_tune(grid, spec: SweepSpec) -> list[dict[str, Any]]:
    """The trials as Tune returned them to this driver, a pack's members each a row of its own
    (results.trial_rows reads the same rows back from MLflow)."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = dict(result.config or {})
        trial_id = metrics.get("trial_id") or (result.path or "").rsplit("/", 1)[-1]
        if PACK in config:
            states = member_states(metrics)
            for index, member in enumerate(config[PACK]):
                key = f"{trial_id}.{index}"
                state = states.get(key, {})
                error = describe_error(result.error) if result.error else state.get("error", "")
                failed = result.error is not None or state.get("status") == "ERROR"
                rows.append(trial_row(spec, key, member, {**state}, failed, error))
            continue
        rows.append(trial_row(spec, trial_id, config, metrics, result.error is not None, describe_error(result.error)))
    return rows


def trial_row(
    spec: SweepSpec, trial_id: str, config: dict[str, Any], metrics: dict[str, Any], failed: bool, error: str
) -> dict[str, Any]:
    """One trial's row: its label, full job config, status and the metrics it reported last."""
    overrides = dict(config.get("fixed_trial", {}))
    searched = {k: v for k, v in config.items() if k not in ("fixed_trial", OPTUNA_TRIAL)}
    row = {
        "trial_id": trial_id,
        "label": trial_label(config, {**spec.config, **overrides, **searched}, spec.job),
        "params": {**spec.config, **{k: v for k, v in overrides.items() if k != "label"}, **searched},
        "status": "ERROR" if failed else "OK",
        "error": error if failed else "",
        "mlflow_run_id": metrics.get("mlflow_run_id", ""),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float) and "/" in k},
    }
    missing = [m for m in spec.metric_names if m not in metrics]
    searched_trial = "fixed_trial" not in config
    stopped = metrics.get("status") == "STOPPED"
    if searched_trial and missing and not failed and not stopped:
        row["status"], row["error"] = "ERROR", f"never reported objective metric(s) {', '.join(missing)}"
    return row


def best_of_run(spec: SweepSpec, paths: SweepDir, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Single objective: the trial the verdict names, over trials merged by seed as the verdict sees them (the
    same rule `status`, `export` and `sweep:<name>/best` use); several: the Pareto front of the study."""
    if len(spec.objectives) > 1 and spec.space:
        return pareto_front(spec, paths.optuna_url)
    return best_of_rows(spec, merge_seed_trials(rows))
