"""Run a validated sweep: Ray Tune trials, an Optuna study, MLflow runs, all keyed by the sweep's name.

Phases: first the fixed trials (the `variants` grid and the automatic teacher-only baseline arms), then the
Optuna search over `space`. Each phase is its own Tune experiment under <results>/<name>/tune/, so running the
same spec again restores it instead of starting over."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# A grid may mix domains whose trials report different metrics (accuracy for images, perplexity for language
# models); trial_rows() flags searched trials that never reported their objective instead.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

from teachsweep import launch, tracking  # noqa: E402
from teachsweep.metrics import PAIRED_METHOD, lot_comparisons, merge_seed_trials, seed_summaries  # noqa: E402
from teachsweep.spec import SpecError, SweepSpec, describe_changes  # noqa: E402


@dataclass
class TrialContext:
    """Plain data a trial process needs (pickled to Ray workers)."""

    sweep: str
    job: str
    fixed: dict[str, Any]
    seeds: list[int]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cpus: float
    workers: int
    gpus: float = 0.0
    train_storage: str | None = None  # where multi-worker trials keep their Train runs
    accelerator: dict[str, float] = field(default_factory=dict)  # e.g. {"accelerator_type:A100": 0.001}


@dataclass
class SweepPaths:
    root: Path  # the results directory shared by sweeps (MLflow store lives here by default)
    sweep: Path  # this sweep's directory

    @property
    def tune(self) -> Path:
        return self.sweep / "tune"

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.sweep / 'optuna.db'}"

    @property
    def fingerprint(self) -> Path:
        return self.sweep / "spec.json"

    @property
    def parent_run(self) -> Path:
        return self.sweep / "mlflow_parent_run_id"

    @property
    def tracking_uri(self) -> Path:
        return self.sweep / "tracking_uri"


@dataclass
class SweepOutcome:
    spec: SweepSpec
    paths: SweepPaths
    tracking_uri: str
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: list[dict[str, Any]] = field(default_factory=list)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    seed_summaries: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def paths_for(spec: SweepSpec) -> SweepPaths:
    root = Path(spec.results_dir).expanduser().resolve()
    return SweepPaths(root, root / spec.name)


# ---------------------------------------------------------------------------------------------- trial


def mean_and_std(finals: list[dict[str, float]]) -> dict[str, float]:
    keys = set.intersection(*(set(f) for f in finals))
    out = {}
    for key in sorted(keys):
        values = [float(f[key]) for f in finals]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable: one configuration, every seed, one MLflow child run."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    overrides = dict(params.get("fixed_trial", {}))
    label = overrides.pop("label", None)
    overrides.pop("variant", None)
    config = {**ctx.fixed, **overrides, **{k: v for k, v in params.items() if k != "fixed_trial"}}
    label = label or str(config.get("arm", ctx.job))
    seeds = [overrides["seed"]] if "seed" in overrides else ctx.seeds  # a grid runs each seed as its own trial
    client = tracking.client_for(ctx.tracking_uri)
    tags = {
        "teachsweep.sweep": ctx.sweep,
        "teachsweep.role": tracking.TRIAL,
        "teachsweep.trial_id": trial_id,
        "teachsweep.job": ctx.job,
        "teachsweep.arm": str(config.get("arm", "")),
        "teachsweep.label": label,
    }
    run_id = tracking.start_child_run(
        client, ctx.experiment_id, ctx.parent_run_id, trial_id, f"{label}-{trial_id}", tags,
        config | {"seeds": seeds},
    )  # fmt: skip
    # Which process runs the trial now (a restarted trial gets a new one): for operators and fault tests.
    tracking.retry(lambda: client.set_tag(run_id, "teachsweep.pid", f"{socket.gethostname()}:{os.getpid()}"))
    job_start = time.perf_counter()
    try:
        if len(seeds) == 1:
            reporter = tracking.TrialReporter(client, run_id, extra={"mlflow_run_id": run_id})
            launch.run_job(
                ctx.job, {**config, "seed": seeds[0]}, reporter, ctx.cpus, ctx.workers, ctx.gpus,
                tracking=(ctx.tracking_uri, run_id), storage=ctx.train_storage, name=f"{ctx.sweep}-{trial_id}",
                accelerator=ctx.accelerator,
            )  # fmt: skip
        else:
            finals = []
            for done, seed in enumerate(seeds, start=1):
                seed_tags = tags | {"teachsweep.role": tracking.SEED, "teachsweep.seed": str(seed)}
                seed_run = tracking.start_child_run(
                    client, ctx.experiment_id, run_id, f"{trial_id}/seed{seed}", f"seed-{seed}", seed_tags,
                    {**config, "seed": seed},
                )  # fmt: skip
                reporter = tracking.TrialReporter(client, seed_run, to_tune=False)
                try:
                    finals.append(launch.run_job(ctx.job, {**config, "seed": seed}, reporter, ctx.cpus, ctx.workers))
                except BaseException as error:
                    tracking.finish_run(client, seed_run, error)
                    raise
                tracking.finish_run(client, seed_run)
                summary = mean_and_std(finals) | {"seeds_done": done}
                tracking.log_metrics(client, run_id, summary, step=done)
                # Per-seed finals travel to the driver for paired LoT-vs-baseline comparisons.
                by_seed = {f"{k}@seed{s}": v for s, f in zip(seeds, finals, strict=False) for k, v in f.items()}
                tune.report(summary | by_seed | {"mlflow_run_id": run_id})
    except BaseException as error:
        tracking.finish_run(client, run_id, error)
        raise
    tracking.log_metrics(client, run_id, {"time/job_s": time.perf_counter() - job_start}, step=0)
    tracking.finish_run(client, run_id)


# ---------------------------------------------------------------------------------------------- planning


def fixed_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """Trials that are not searched: each variant (with its baseline arms) and the search's baseline arms.
    A grid (no search space) runs each seed as its own trial, so seeds spread over the cluster."""
    trials = unseeded_fixed_trials(spec)
    if spec.space or len(spec.seeds) == 1:
        return trials
    return [{**trial, "seed": seed} for seed in spec.seeds for trial in trials]  # seed-major: mixes costs


def unseeded_fixed_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    overlays = spec.variants.items() if spec.variants else [("", {})]
    trials = []
    for name, overlay in overlays:
        config = {**spec.config, **overlay}
        tag = {"variant": name} if name else {}
        if spec.variants:
            arm = config.get("arm", "lot") if spec.job == "lot" else None
            trials.append({"label": f"{name}-{arm}" if arm else name, **tag, **overlay})
        if spec.baseline is not None:
            for arm in baseline_arms(spec, config):
                label = f"{name}-{arm.pop('label')}" if name else arm.pop("label")
                trials.append({"label": label, **tag, **overlay, **arm})
    return trials


def baseline_arms(spec: SweepSpec, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Teacher-only arms at each matched budget. Same teacher steps: one arm. Same total model-steps: the
    teacher trains (1 + N*K) times as many steps, one arm per N the sweep can pick."""
    from teachsweep.jobs.lot import LoTConfig

    base = LoTConfig.model_validate(config)
    arms = []
    if "teacher_steps" in spec.baseline.budgets:
        arms.append({"label": "teacher_only", "arm": "teacher_only"})
    if "model_steps" in spec.baseline.budgets:
        n_values = [base.student_steps]
        if "student_steps" in spec.space:
            param = spec.space["student_steps"]
            n_values = param.values if param.type == "categorical" else list(range(int(param.low), int(param.high) + 1))
        k = config.get("num_students", base.num_students)
        arms += [
            {"label": f"teacher_only-N{n}", "arm": "teacher_only", "budget_multiplier": float(1 + n * k)}
            for n in sorted(set(n_values))
        ]
    return arms


def optuna_space(spec: SweepSpec) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = {}
    for key, p in spec.space.items():
        if p.type == "categorical":
            space[key] = CategoricalDistribution(p.values)
        elif p.type == "int":
            space[key] = IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            space[key] = FloatDistribution(p.low, p.high, log=p.type == "loguniform")
    return space


# ---------------------------------------------------------------------------------------------- preflight


def preflight(spec: SweepSpec, paths: SweepPaths) -> str:
    """Everything that can fail before a single file, run or study is created."""
    existing = next((p for p in [paths.root, *paths.root.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"results directory {paths.root} is not writable")
    if paths.root.exists() and not os.access(paths.root, os.W_OK | os.X_OK):
        raise SpecError(f"results directory {paths.root} is not writable")
    uri = spec.tracking_uri or tracking.default_tracking_uri(paths.root)
    try:
        tracking.check_tracking_uri(uri)
    except tracking.TrackingError as error:
        raise SpecError(str(error)) from None
    if paths.fingerprint.exists():
        old = json.loads(paths.fingerprint.read_text())
        changes = describe_changes(old, spec.fingerprint())
        if changes:
            raise SpecError(
                f"sweep '{spec.name}' exists with a different spec ({'; '.join(changes)}): "
                "use a new name, or delete its results directory"
            )
    return uri


def init_ray(total_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        num_cpus=None if os.environ.get("RAY_ADDRESS") else total_cpus,
        include_dashboard=False,
        log_to_driver=os.environ.get("TEACHSWEEP_TRIAL_LOGS", "0") == "1",
        logging_level="ERROR",
    )


def max_concurrency(spec: SweepSpec) -> int:
    import ray

    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    cpus = ray.cluster_resources().get("CPU", 1)
    by_cpu = int(cpus // (spec.resources.cpus * spec.resources.workers)) or 1
    if spec.resources.gpus:
        gpus = ray.cluster_resources().get("GPU", 0)
        return max(1, min(by_cpu, int(gpus // (spec.resources.gpus * spec.resources.workers))))
    return by_cpu


# ---------------------------------------------------------------------------------------------- running


def quiet_libraries() -> None:
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def run_sweep(spec: SweepSpec, spec_text: str, callbacks: list | None = None) -> SweepOutcome:
    quiet_libraries()
    paths = paths_for(spec)
    uri = preflight(spec, paths)
    start = time.time()

    from ray import tune

    paths.sweep.mkdir(parents=True, exist_ok=True)
    paths.fingerprint.write_text(json.dumps(spec.fingerprint(), indent=1, sort_keys=True))
    (paths.sweep / "spec.yaml").write_text(spec_text)
    paths.tracking_uri.write_text(uri)

    client = tracking.client_for(uri)
    # A SQLite store keeps artifacts beside it (MLflow's default would be ./mlruns in the current directory).
    artifacts = (paths.root / "artifacts").as_uri() if uri.startswith("sqlite:") else None
    experiment_id = tracking.ensure_experiment(client, spec.experiment or spec.name, artifacts)
    parent_params = {"job": spec.job, "config": spec.config, "space": spec.model_dump()["space"],
                     "seeds": spec.seeds, "num_samples": spec.num_samples, "objectives": spec.metric_names}  # fmt: skip
    known_parent = paths.parent_run.read_text().strip() if paths.parent_run.exists() else None
    parent_run_id = tracking.start_parent_run(client, experiment_id, spec.name, parent_params, spec_text, known_parent)
    paths.parent_run.write_text(parent_run_id)

    init_ray()
    ctx = TrialContext(
        spec.name, spec.job, spec.config, spec.seeds, uri, experiment_id, parent_run_id,
        spec.resources.cpus, spec.resources.workers, spec.resources.gpus, str(paths.tune / "train"),
        spec.resources.accelerator(),
    )  # fmt: skip
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

        grid = run_experiment(spec, paths, trainable, callbacks, forget_unrecorded_trials)
        outcome.trials = trial_rows(grid, spec)
        outcome.best = best_trials(spec, paths, outcome.trials)
        merged = merge_seed_trials(outcome.trials)
        outcome.comparisons = lot_comparisons(merged, comparison_metrics(spec))
        log_comparisons(client, parent_run_id, outcome.comparisons)
        outcome.seed_summaries = seed_summaries(merged, comparison_metrics(spec))
        if outcome.seed_summaries:
            tracking.retry(lambda: client.log_dict(parent_run_id, outcome.seed_summaries, "seed_summary.json"))
    except BaseException as err:
        error = err
        raise
    finally:
        outcome.seconds = time.time() - start
        tracking.log_metrics(client, parent_run_id, {"sweep/wall_s": outcome.seconds}, step=0)
        if outcome.best:
            tracking.retry(lambda: client.log_dict(parent_run_id, outcome.best, "best.json"))
        tracking.finish_run(client, parent_run_id, error if not isinstance(error, KeyboardInterrupt) else None)
    return outcome


def comparison_metrics(spec: SweepSpec) -> list[str]:
    """Objectives plus the test scores of record (whichever the trials report): the teacher's accuracy or
    perplexity (LoT), the student's test simulability and accuracy (SMaT)."""
    scores = ["teacher/test_acc", "teacher/test_ppl", "simulability/test", "student/test_acc",
              "teacher/test_acc_at_best_val", "teacher/test_ppl_at_best_val", "steps/teacher_at_best_val",
              "steps/model_at_best_val"]  # fmt: skip
    return list(dict.fromkeys(spec.metric_names + scores))


def log_comparisons(client, parent_run_id: str, comparisons: list[dict[str, Any]]) -> None:
    """LoT minus teacher-only per variant and metric, as parent-run metrics and a JSON table."""
    if not comparisons:
        return
    tracking.retry(lambda: client.log_dict(parent_run_id, comparisons, "lot_vs_teacher_only.json"))
    flat = {}
    for row in comparisons:
        variant = row["variant"] + "/" if row["variant"] else ""
        prefix = f"compare/{variant}{row['trial']}/{row['budget']}/{row['metric']}"
        flat |= {f"{prefix}/{k}": row[k] for k in ("diff_mean", "ci_low", "ci_high", "p_value", "lot_mean",
                                                     "teacher_only_mean")}  # fmt: skip
    tracking.log_metrics(client, parent_run_id, flat, step=0)
    tracking.retry(lambda: client.set_tag(parent_run_id, "compare.interval_method", PAIRED_METHOD))


class FixedThenSearch:
    """A Tune searcher that hands out the fixed trials (variants, baseline arms) first, then the wrapped
    searcher's suggestions. Fixed trials are never told to the wrapped searcher, so the Optuna study holds
    searched trials only, while all trials share one Tune experiment (and the machine's CPUs). Tune saves it
    like its own wrappers: get_state() here, the wrapped searcher's state in its own file."""

    def __new__(cls, fixed: list[dict], searcher, metric, mode):
        from ray.tune.search import Searcher

        class NothingToSearch(Searcher):
            def suggest(self, trial_id):
                return Searcher.FINISHED

            def on_trial_complete(self, trial_id, result=None, error=False):
                pass

            def save(self, checkpoint_path):
                # Nothing to keep, but Tune's restore insists on finding the base searcher's file.
                with open(checkpoint_path, "wb") as f:
                    f.write(b"")

            def restore(self, checkpoint_path):
                pass

        class _FixedThenSearch(Searcher):
            def __init__(self):
                super().__init__(metric=metric, mode=mode)
                self.pending, self.fixed_ids = list(fixed), set()
                self.searcher = searcher or NothingToSearch(metric=metric, mode=mode)

            def set_search_properties(self, metric, mode, config, **spec):
                return self.searcher.set_search_properties(metric, mode, config, **spec)

            def suggest(self, trial_id):
                if self.pending:
                    self.fixed_ids.add(trial_id)
                    return {"fixed_trial": self.pending.pop(0)}
                return self.searcher.suggest(trial_id)

            def on_trial_result(self, trial_id, result):
                if trial_id in self.fixed_ids:
                    return
                if not failed_on_resume(self.searcher, trial_id):
                    self.searcher.on_trial_result(trial_id, result)

            def on_trial_complete(self, trial_id, result=None, error=False):
                if trial_id in self.fixed_ids:
                    return
                if failed_on_resume(self.searcher, trial_id):
                    # Re-run after a resume. A trial whose result reached Optuna before the driver died is
                    # not told twice; one failed on resume comes back as a new trial with the same parameters.
                    if not error and optuna_state(self.searcher, trial_id) == "FAIL":
                        tell_again(self.searcher, trial_id, result)
                    return
                self.searcher.on_trial_complete(trial_id, result=result, error=error)

            def get_state(self):
                return {"pending": list(self.pending), "fixed_ids": set(self.fixed_ids)}

            def set_state(self, state):
                self.pending, self.fixed_ids = state["pending"], state["fixed_ids"]

            def save(self, checkpoint_path):
                self.searcher.save(checkpoint_path)

            def restore(self, checkpoint_path):
                self.searcher.restore(checkpoint_path)

        return _FixedThenSearch()


def fail_interrupted_optuna_trials(spec: SweepSpec, paths: SweepPaths) -> list[int]:
    """Optuna trials left RUNNING by a driver that died are marked FAIL; Tune re-runs their trials, and their
    results come back to the study as new trials (see `tell_again`)."""
    if not spec.space or not (paths.sweep / "optuna.db").exists():
        return []
    import optuna

    storage = optuna.storages.RDBStorage(paths.optuna_url)
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        return []
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        failed.append(trial.number)
    return failed


def failed_on_resume(searcher, trial_id: str) -> bool:
    """Whether the Optuna trial behind a running Tune trial is already finished (failed on resume)."""
    original = getattr(searcher, "_ot_trials", {}).get(trial_id)
    if original is None:
        return False
    return searcher._ot_study._storage.get_trial(original._trial_id).state.is_finished()


def optuna_state(searcher, trial_id: str) -> str | None:
    original = getattr(searcher, "_ot_trials", {}).get(trial_id)
    return None if original is None else searcher._ot_study._storage.get_trial(original._trial_id).state.name


def tell_again(searcher, trial_id: str, result: dict | None) -> None:
    """Report a re-run trial whose original Optuna trial was failed on resume, as a new finished trial."""
    import optuna

    original = searcher._ot_trials.get(trial_id)
    metrics = searcher.metric if isinstance(searcher.metric, list) else [searcher.metric]
    if original is None or not result or any(m not in result for m in metrics):
        return
    values = [float(result[m]) for m in metrics]
    searcher._ot_study.add_trial(
        optuna.trial.create_trial(
            params=original.params,
            distributions=original.distributions,
            values=values if len(values) > 1 else None,
            value=values[0] if len(values) == 1 else None,
        )  # fmt: skip
    )


def make_searcher(spec: SweepSpec, paths: SweepPaths):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    fixed = fixed_trials(spec)
    multi = len(spec.objectives) > 1
    metric = spec.metric_names if multi else spec.metric_names[0]
    mode = spec.mode_names if multi else spec.mode_names[0]
    searcher = None
    if spec.space:
        sampler = (
            optuna.samplers.TPESampler(seed=spec.sampler.seed)
            if spec.sampler.type == "tpe"
            else optuna.samplers.RandomSampler(seed=spec.sampler.seed)
        )
        searcher = OptunaSearch(
            space=optuna_space(spec), metric=metric, mode=mode, sampler=sampler, study_name=spec.name,
            storage=optuna.storages.RDBStorage(paths.optuna_url),
        )  # fmt: skip
    total = len(fixed) + (spec.num_samples if spec.space else 0)
    return FixedThenSearch(fixed, searcher, spec.metric_names[0], spec.mode_names[0]), total


def make_scheduler(spec: SweepSpec):
    """ASHA on the first objective, epochs as time; fixed trials (baselines) are never stopped early."""
    if spec.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class SearchOnlyASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            if "fixed_trial" in trial.config:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return SearchOnlyASHA(
        time_attr="epoch", metric=spec.metric_names[0], mode=spec.mode_names[0],
        max_t=spec.scheduler.max_t or int(spec.config.get("epochs", 3)), grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )  # fmt: skip


def run_experiment(spec: SweepSpec, paths: SweepPaths, trainable, callbacks, on_restore: Callable[[set[str]], None]):
    """Run the sweep's Tune experiment, or resume it; `on_restore` gets the ids of the trials Tune recorded."""
    from ray import tune

    experiment = paths.tune / "trials"
    if tune.Tuner.can_restore(str(experiment)):
        fail_interrupted_optuna_trials(spec, paths)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
        on_restore({Path(result.path).name for result in tuner.get_results()})  # trial dirs are named by id
        return tuner.fit()
    searcher, total = make_searcher(spec, paths)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(spec),
            num_samples=total,
            max_concurrent_trials=max_concurrency(spec),
            trial_dirname_creator=lambda trial: trial.trial_id,
            # One trial process runs trial after trial: imports, data and tokenizer caches are paid once.
            reuse_actors=True,
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name="trials",
            storage_path=str(paths.tune),
            verbose=0,
            callbacks=callbacks or [],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),  # fmt: skip
    )
    return tuner.fit()


def describe_error(error: BaseException) -> str:
    """The root cause of a trial's failure in one line (Ray wraps it in task errors with tracebacks)."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"[:500]


def trial_rows(grid, spec: SweepSpec) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = dict(result.config or {})
        overrides = dict(config.pop("fixed_trial", {}))
        label = overrides.pop("label", None) or str({**spec.config, **config}.get("arm", spec.job))
        row = {
            "trial_id": metrics.get("trial_id") or (result.path or "").rsplit("/", 1)[-1],
            "label": label,
            "params": {**spec.config, **overrides, **config},  # the trial's full job config
            "status": "ERROR" if result.error else "OK",
            "error": describe_error(result.error) if result.error else "",
            "mlflow_run_id": metrics.get("mlflow_run_id", ""),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float) and "/" in k},
        }
        missing = [m for m in spec.metric_names if m not in metrics]
        searched = "fixed_trial" not in (result.config or {})
        if searched and missing and not result.error:
            row["status"], row["error"] = "ERROR", f"never reported objective metric(s) {', '.join(missing)}"
        rows.append(row)
    return rows


def best_trials(spec: SweepSpec, paths: SweepPaths, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Single objective: the best finished trial. Several: the Pareto front from the Optuna study."""
    if len(spec.objectives) > 1 and spec.space:
        import optuna

        study = optuna.load_study(study_name=spec.name, storage=paths.optuna_url)
        return [{"params": t.params, "values": dict(zip(spec.metric_names, t.values, strict=True)),
                 "optuna_trial": t.number} for t in study.best_trials]  # fmt: skip
    metric, mode = spec.metric_names[0], spec.mode_names[0]
    done = [r for r in rows if r["status"] == "OK" and metric in r["metrics"]]
    if not done:
        return []
    best = (max if mode == "max" else min)(done, key=lambda r: r["metrics"][metric])
    return [{"params": best["params"], "values": {metric: best["metrics"][metric]}, "trial_id": best["trial_id"],
             "label": best["label"], "mlflow_run_id": best["mlflow_run_id"]}]  # fmt: skip


def delete_sweep(spec: SweepSpec) -> None:
    """Remove a sweep's Tune and Optuna state (its MLflow runs stay)."""
    shutil.rmtree(paths_for(spec).sweep, ignore_errors=True)
