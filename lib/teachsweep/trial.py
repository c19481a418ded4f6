"""The Tune function trainable: one trial = one job configuration, run for each of its seeds, in one MLflow child
run (a child run per seed when there are several). The job runs in this process, or under a TorchTrainer when the
trial spans several workers (launch.py); its teacher references were resolved here, so the job never talks to
MLflow."""

from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from teachsweep import launch, references, tracking
from teachsweep.jobs import JOBS


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
    stage_tags: dict[str, str] = field(default_factory=dict)  # a pipeline stage's trials: pipeline and stage


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


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable: one configuration, every seed, one MLflow child run."""
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    overrides = dict(params.get("fixed_trial", {}))
    label = overrides.pop("label", None)
    overrides.pop("variant", None)
    teacher_source = overrides.pop("teacher_source", None)
    config = {**ctx.fixed, **overrides, **{k: v for k, v in params.items() if k != "fixed_trial"}}
    arm = str(config.get("arm", JOBS[ctx.job].default_arm or ""))
    label = label or arm or ctx.job
    seeds = [overrides["seed"]] if "seed" in overrides else ctx.seeds  # a grid runs each seed as its own trial
    teachers = {f: str(teacher_source or config[f])[:250] for f in JOBS[ctx.job].teacher_fields if f in config}
    # the teacher's own run, so that reading the students never needs the teachers' sweep (it may be re-run)
    teacher_runs = {
        f: config[f].removeprefix(references.MLFLOW)
        for f in JOBS[ctx.job].teacher_fields
        if isinstance(config.get(f), str) and config[f].startswith(references.MLFLOW)
    }
    config = references.resolve_config(config, JOBS[ctx.job].teacher_fields, ctx.tracking_uri)
    if "device" in JOBS[ctx.job].config_class.model_fields and (ctx.workers == 1 or not ctx.gpus):  # (DDP workers
        # with GPUs run where Ray Train placed them, and this process drives them without one)
        config = device_for(config, ctx.gpus, torch.cuda.is_available())
    client = tracking.client_for(ctx.tracking_uri)
    tags = {
        "teachsweep.sweep": ctx.sweep,
        "teachsweep.role": tracking.TRIAL,
        "teachsweep.trial_id": trial_id,
        "teachsweep.job": ctx.job,
        "teachsweep.arm": arm,
        "teachsweep.label": label,
        **{f"teachsweep.{field}": source for field, source in teachers.items()},  # which teacher it used
        **{f"teachsweep.{field}_run": run for field, run in teacher_runs.items()},
        **ctx.stage_tags,
    }
    run_id = tracking.start_child_run(
        client,
        ctx.experiment_id,
        ctx.parent_run_id,
        trial_id,
        f"{label}-{trial_id}",
        tags,
        config | {"seeds": seeds},
    )
    # Which node and process run the trial now (a restarted trial gets new ones): for operators and fault tests.
    tracking.retry(lambda: client.set_tag(run_id, "teachsweep.pid", f"{socket.gethostname()}:{os.getpid()}"))
    tracking.retry(lambda: client.set_tag(run_id, "teachsweep.node", ray.get_runtime_context().get_node_id()))
    job_start = time.perf_counter()
    try:
        if len(seeds) == 1:
            reporter = tracking.TrialReporter(client, run_id, extra={"mlflow_run_id": run_id})
            launch.run_job(
                ctx.job,
                {**config, "seed": seeds[0]},
                reporter,
                ctx.cpus,
                ctx.workers,
                ctx.gpus,
                tracking=(ctx.tracking_uri, run_id),
                storage=ctx.train_storage,
                name=f"{ctx.sweep}-{trial_id}",
                accelerator=ctx.accelerator,
            )
        else:
            finals = []
            for done, seed in enumerate(seeds, start=1):
                seed_tags = tags | {"teachsweep.role": tracking.SEED, "teachsweep.seed": str(seed)}
                seed_run = tracking.start_child_run(
                    client,
                    ctx.experiment_id,
                    run_id,
                    f"{trial_id}/seed{seed}",
                    f"seed-{seed}",
                    seed_tags,
                    {**config, "seed": seed},
                )
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
