"""The Tune function trainable: one trial = one job configuration, run for each of its seeds, in one MLflow child
run (a child run per seed when there are several), or one pack of configurations trained together, each member
in its own MLflow run and Optuna trial. The job runs in this process, or under a TorchTrainer when the trial spans
several workers (launch.py); its teacher references were resolved here, so the job never talks to MLflow."""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune import Checkpoint, get_checkpoint

from teachsweep import launch, references, tracking
from teachsweep.early_stopping import CONTINUE, CUT, StudyASHA
from teachsweep.jobs import JOBS
from teachsweep.launch import Placement, TrainRun
from teachsweep.plan import OPTUNA_TRIAL, PACK, member_id
from teachsweep.reporter import PackReporter, finite_metrics
from teachsweep.teacher_refs import MLFLOW


@dataclass(frozen=True)
class SweepRecords:
    """Where a sweep's trials record: its MLflow store, experiment and parent run, and a pipeline stage's tags."""

    sweep: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    stage_tags: dict[str, str] = field(default_factory=dict)
    code_tags: dict[str, str] = field(default_factory=dict)  # the driver's commit and whether its tree was dirty


@dataclass(frozen=True)
class TrialContext:
    """Plain data a trial process needs (pickled to Ray workers)."""

    records: SweepRecords
    job: str
    fixed: dict[str, Any]  # the config every trial starts from (searched values and fixed overrides go on top)
    seeds: list[int]
    placement: Placement
    train_storage: str | None = None  # where multi-worker trials keep their Train runs
    objective: str = ""  # the first objective: what a searched pack member reports to its Optuna trial
    member_stopping: StudyASHA | None = None  # packs: early stopping decided per searched member


@dataclass(frozen=True)
class PlannedRun:
    """One configuration as a trial (or a pack member) runs it: its label, config, seeds and MLflow tags."""

    label: str
    arm: str
    config: dict[str, Any]
    seeds: list[int]
    tags: dict[str, str]


def device_for(config: dict[str, Any], gpus: float, cuda_available: bool) -> dict[str, Any]:
    """The job's device as the trial's reservation allows: a trial that reserved no GPU runs on the CPU even where
    CUDA is visible (Ray no longer hides a node's GPUs from tasks that reserve none, so `auto` would put every
    such trial on cuda:0); a trial that reserved GPUs refuses to start on a torch without CUDA."""
    if gpus and not cuda_available:
        raise RuntimeError(
            f"resources.gpus: {gpus:g} GPU(s) reserved, but torch {torch.__version__} here has no "
            "CUDA (a CPU build, or no driver): install a CUDA torch on the GPU nodes"
        )
    if not gpus and config.get("device", "auto") == "auto":
        return config | {"device": "cpu"}
    return config


def mean_and_std(finals: list[dict[str, float]]) -> dict[str, float]:
    keys = set.intersection(*(set(f) for f in finals))
    out = {}
    for key in sorted(keys):
        values = [float(f[key]) for f in finals]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def trial_label(params: dict[str, Any], config: dict[str, Any], job: str) -> str:
    """What tables call a trial: its fixed trial's label, else its arm, else the job."""
    label = params.get("fixed_trial", {}).get("label")
    return label or str(config.get("arm", JOBS[job].default_arm or "")) or job


def planned_run(params: dict[str, Any], ctx: TrialContext, trial_id: str) -> PlannedRun:
    """A trial's (or member's) params as the config it trains, its seeds and the tags of its MLflow run."""
    overrides = dict(params.get("fixed_trial", {}))
    overrides.pop("label", None)
    overrides.pop("variant", None)
    teacher_source = overrides.pop("teacher_source", None)
    searched = {k: v for k, v in params.items() if k not in ("fixed_trial", OPTUNA_TRIAL)}
    config = {**ctx.fixed, **overrides, **searched}
    job = JOBS[ctx.job]
    arm = str(config.get("arm", job.default_arm or ""))
    label = trial_label(params, config, ctx.job)
    seeds = [overrides["seed"]] if "seed" in overrides else ctx.seeds  # a grid runs each seed as its own trial
    teachers = {f: str(teacher_source or config[f])[:250] for f in job.teacher_fields if f in config}
    # the teacher's own run, so that reading the students never needs the teachers' sweep (it may be re-run)
    teacher_runs = {
        f: config[f].removeprefix(MLFLOW)
        for f in job.teacher_fields
        if isinstance(config.get(f), str) and config[f].startswith(MLFLOW)
    }
    config = references.resolve_config(config, job.teacher_fields, ctx.records.tracking_uri)
    placement = ctx.placement
    if "device" in job.config_class.model_fields and (placement.workers == 1 or not placement.gpus):  # (DDP
        # workers with GPUs run where Ray Train placed them, and this process drives them without one)
        config = device_for(config, placement.gpus, torch.cuda.is_available())
    tags = {
        "teachsweep.sweep": ctx.records.sweep,
        "teachsweep.role": tracking.TRIAL,
        "teachsweep.trial_id": trial_id,
        "teachsweep.job": ctx.job,
        "teachsweep.arm": arm,
        "teachsweep.label": label,
        **{f"teachsweep.{field}": source for field, source in teachers.items()},  # which teacher it used
        **{f"teachsweep.{field}_run": run for field, run in teacher_runs.items()},
        **ctx.records.stage_tags,
        **ctx.records.code_tags,
    }
    return PlannedRun(label, arm, config, seeds, tags)


def start_run(client, ctx: TrialContext, trial_id: str, run: PlannedRun) -> str:
    """The trial's MLflow child run (found again when the trial restarts), tagged with where it runs now."""
    records = ctx.records
    params = run.config | {"seeds": run.seeds}
    run_id = tracking.start_child_run(
        client, records.experiment_id, records.parent_run_id, trial_id, f"{run.label}-{trial_id}", run.tags, params
    )
    for key, value in running_here().items():
        tracking.retry(lambda k=key, v=value: client.set_tag(run_id, k, v))
    return run_id


def running_here() -> dict[str, str]:
    """Which node and process run the trial now (a restarted trial gets new ones): for operators and fault tests."""
    return {
        "teachsweep.pid": f"{socket.gethostname()}:{os.getpid()}",
        "teachsweep.node": ray.get_runtime_context().get_node_id(),
    }


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable: one configuration, every seed, one MLflow child run; or a pack."""

    trial_id = tune.get_context().get_trial_id()
    if PACK in params:
        run_pack_trial(params[PACK], ctx, trial_id)
        return
    run = planned_run(params, ctx, trial_id)
    client = tracking.client_for(ctx.records.tracking_uri)
    run_id = start_run(client, ctx, trial_id, run)
    job_start = time.perf_counter()
    try:
        if len(run.seeds) == 1:
            reporter = tracking.TrialReporter(client, run_id, extra={"mlflow_run_id": run_id})
            train_run = TrainRun(ctx.records.tracking_uri, run_id, ctx.train_storage, f"{ctx.records.sweep}-{trial_id}")
            launch.run_job(ctx.job, {**run.config, "seed": run.seeds[0]}, reporter, ctx.placement, train_run)
        else:
            run_seeds(client, ctx, trial_id, run, run_id)
    except BaseException as error:
        tracking.finish_run(client, run_id, error)
        raise
    tracking.log_metrics(client, run_id, {"time/job_s": time.perf_counter() - job_start}, step=0)
    tracking.finish_run(client, run_id)


def run_seeds(client, ctx: TrialContext, trial_id: str, run: PlannedRun, run_id: str) -> None:
    """A trial of several seeds: one child run per seed under the trial's run, their mean and spread reported
    after each seed, and the per-seed finals for the driver's paired comparisons."""

    finals = []
    for done, seed in enumerate(run.seeds, start=1):
        seed_tags = run.tags | {"teachsweep.role": tracking.SEED, "teachsweep.seed": str(seed)}
        records = ctx.records
        key, name = f"{trial_id}/seed{seed}", f"seed-{seed}"
        seed_config = {**run.config, "seed": seed}
        seed_run = tracking.start_child_run(client, records.experiment_id, run_id, key, name, seed_tags, seed_config)
        reporter = tracking.TrialReporter(client, seed_run, to_tune=False)
        train_run = TrainRun(records.tracking_uri, seed_run, ctx.train_storage, f"{records.sweep}-{trial_id}-{seed}")
        try:
            finals.append(launch.run_job(ctx.job, {**run.config, "seed": seed}, reporter, ctx.placement, train_run))
        except BaseException as error:
            tracking.finish_run(client, seed_run, error)
            raise
        tracking.finish_run(client, seed_run)
        summary = mean_and_std(finals) | {"seeds_done": done}
        tracking.log_metrics(client, run_id, summary, step=done)
        # Per-seed finals travel to the driver for paired LoT-vs-baseline comparisons.
        by_seed = {f"{k}@seed{s}": v for s, f in zip(run.seeds, finals, strict=False) for k, v in f.items()}
        tune.report(summary | by_seed | {"mlflow_run_id": run_id})


# ---------------------------------------------------------------------------------------------- packs

RUNNING, OK, ERROR, STOPPED = "RUNNING", "OK", "ERROR", "STOPPED"


class TunePackReporter(PackReporter):
    """A pack's reporter in a sweep: each member's epochs go to its own MLflow run (its TrialReporter), searched
    members report their objective to their own Optuna trial and stop by ASHA's rule on their own, and the pack
    sends Tune one result per epoch, every member's metrics and state under `pack`, with one checkpoint."""

    def __init__(
        self,
        members: list[tracking.TrialReporter],
        ids: list[str],
        numbers: list[int | None],
        objective: str,
        stopping: StudyASHA | None,
        saved: dict | None = None,
    ) -> None:
        super().__init__(list(members))
        self.saved = saved  # the pack's last checkpoint, read once by the pack trial
        self.ids, self.numbers, self.objective, self.stopping = ids, numbers, objective, stopping
        self.state = {i: {"status": RUNNING, "mlflow_run_id": m.run_id} for i, m in zip(ids, members, strict=True)}

    def resume_states(self, previous: dict[str, dict[str, Any]]) -> None:
        """A restarted pack: members that had failed or stopped stay so (the job does not train them again)."""
        for trial, state in previous.items():
            if state.get("status") in (ERROR, STOPPED):
                self.state[trial] = state

    def early_stops(self, epoch: int, results: dict[int, dict[str, float]]) -> set[int]:
        """Searched members that ASHA's rule ends now: cut at a milestone (STOPPED), or at `max_t`, where Tune ends
        a trial as finished; both leave the pack without saving a teacher, as a trial Tune stops does."""
        leaving = set()
        for member, metrics in results.items():
            value, number = metrics.get(self.objective), self.numbers[member]
            if self.stopping is None or number is None or not isinstance(value, int | float):
                continue
            decision = self.stopping.decide(number, epoch, float(value))
            if decision != CONTINUE:
                leaving.add(member)
            if decision == CUT:
                self.state[self.ids[member]]["status"] = STOPPED
        return leaving

    def report(self, epoch: int, results: dict[int, dict[str, float]], checkpoint: dict | None = None) -> None:
        for member, metrics in results.items():
            self.members[member].report(metrics, epoch)
            self.state[self.ids[member]] |= finite_metrics(metrics) | {"epoch": epoch}
        self.send({PACK: self.state, "epoch": epoch}, checkpoint)

    def fail(self, member: int, error: BaseException) -> None:
        super().fail(member, error)
        self.state[self.ids[member]] |= {"status": ERROR, "error": f"{type(error).__name__}: {error}"[:500]}
        tracking.finish_run(self.members[member].client, self.members[member].run_id, error)

    def send(self, result: dict, checkpoint: dict | None) -> None:
        if checkpoint is None:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory() as directory:
            torch.save(checkpoint | {"pack_states": self.state}, f"{directory}/state.pt")
            tune.report(result, checkpoint=Checkpoint.from_directory(directory))

    def restore(self) -> dict | None:
        return self.saved


def last_checkpoint() -> dict | None:
    """The pack's last checkpoint when Tune restarts it, else None."""

    checkpoint = get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return tracking.load_state(Path(directory))


def run_pack_trial(members: list[dict[str, Any]], ctx: TrialContext, pack_id: str) -> None:
    """A pack: each member planned as its own trial would be (its own MLflow run, tagged with the pack), then
    the job's packed training; members that fail fail alone, and the pack ends with one result naming each
    member's status and final metrics."""
    client = tracking.client_for(ctx.records.tracking_uri)
    ids = [member_id(pack_id, i) for i in range(len(members))]
    runs = [planned_run(params, ctx, trial) for params, trial in zip(members, ids, strict=True)]
    saved = last_checkpoint()
    previous = saved["pack_states"] if saved else {}
    ended = {trial for trial in ids if previous.get(trial, {}).get("status") in (ERROR, STOPPED)}
    records = ctx.records
    where = {"teachsweep.pack_id": pack_id} | running_here()
    started = tracking.start_member_runs(
        client,
        records.experiment_id,
        records.parent_run_id,
        pack_id,
        [
            (trial, f"{run.label}-{trial}", run.tags | where, run.config | {"seeds": run.seeds})
            for trial, run in zip(ids, runs, strict=True)
            if trial not in ended  # ended before the restart: left as it was
        ],
    )
    run_ids, reporters, fresh = [], [], iter(started)
    for trial in ids:
        run_id, created = (previous[trial]["mlflow_run_id"], False) if trial in ended else next(fresh)
        reporter = tracking.TrialReporter(client, run_id, to_tune=False)
        if created:
            reporter.logged_before = set()  # a new run holds no epoch yet
        run_ids.append(run_id)
        reporters.append(reporter)
    numbers = [params.get(OPTUNA_TRIAL) for params in members]
    pack = TunePackReporter(reporters, ids, numbers, ctx.objective, ctx.member_stopping, saved)
    pack.resume_states(previous)
    configs = [{**run.config, "seed": run.seeds[0]} for run in runs]
    start = time.perf_counter()
    try:
        finals = launch.run_pack(ctx.job, configs, pack, ctx.placement)
    except BaseException as error:
        for index, run_id in enumerate(run_ids):
            status = pack.state[ids[index]]["status"]
            if status == RUNNING:
                tracking.finish_run(client, run_id, error)
            elif status == STOPPED:  # it had ended before the pack failed, as its unpacked twin would have
                tracking.retry(lambda r=run_id: client.set_tag(r, "teachsweep.stopped_early", "ASHA"))
                tracking.finish_run(client, run_id)
        raise
    seconds = time.perf_counter() - start
    for index, run_id in enumerate(run_ids):
        state = pack.state[ids[index]]
        if state["status"] == ERROR:
            continue
        if state["status"] == RUNNING:
            state["status"] = OK
        state |= finite_metrics(finals.get(index, {}))
        tracking.log_metrics(client, run_id, {"time/job_s": seconds}, step=0)
        if state["status"] == STOPPED:
            tracking.retry(lambda r=run_id: client.set_tag(r, "teachsweep.stopped_early", "ASHA"))
        tracking.finish_run(client, run_id)

    tune.report({PACK: pack.state, "done_members": len(ids)})
