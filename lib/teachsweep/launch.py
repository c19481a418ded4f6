"""Where a trial's job actually runs.

One worker (the default): the job's train function runs in the Tune trial process itself. A TorchTrainer per
trial costs tens of seconds of start-up on a small machine (docs/benchmarks.md, `bench distributed`: 107 s vs 23.5 s
for four trivial trials), so it is only worth it when a trial spans several workers or GPUs.

Several workers: the trial starts a `ray.train.torch.TorchTrainer` (Train V2) whose workers run the same train
function under DDP (gloo on CPU, NCCL on GPU); every worker reports with `ray.train.report`, rank 0 logs to
MLflow, and `TuneReportCallback` forwards rank 0's metrics to the Tune trial (and so to Optuna and ASHA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from teachsweep import tracking
from teachsweep.jobs import JOBS
from teachsweep.reporter import PackReporter, Reporter

CHECKPOINTS_KEPT = 2  # the newest and the one before it, in case the newest was half-written


@dataclass(frozen=True)
class Placement:
    """What one trial reserves: CPUs and GPUs per worker, its workers, and a GPU type's token resource."""

    cpus: float = 1.0
    gpus: float = 0.0
    workers: int = 1
    accelerator: dict[str, float] = field(default_factory=dict)  # e.g. {"accelerator_type:A100": 0.001}


@dataclass(frozen=True)
class TrainRun:
    """Where a multi-worker trial's rank 0 logs (MLflow store and run) and Ray Train keeps its run."""

    tracking_uri: str
    run_id: str
    storage: str | None = None
    name: str = "trial"


def run_job(
    job: str,
    config: dict[str, Any],
    reporter: Reporter,
    placement: Placement = Placement(),
    train_run: TrainRun | None = None,
) -> dict:
    """The job's train function in this process, or under a TorchTrainer when the trial spans several workers
    (then `train_run`, a TrainRun, says where rank 0 logs)."""
    if placement.workers > 1:
        if train_run is None:
            raise ValueError("multi-worker trials need a TrainRun (tracking URI, run id) to log from rank 0")
        return run_distributed(job, config, placement, train_run)
    torch.set_num_threads(max(1, int(placement.cpus)))
    return JOBS[job].train(config, reporter)


def run_pack(
    job: str, configs: list[dict[str, Any]], reporter: PackReporter, placement: Placement = Placement()
) -> dict[int, dict[str, float]]:
    """A pack of configurations of one job trained together in this process (packing.py)."""
    train_pack = JOBS[job].spec.train_pack
    if train_pack is None:
        raise ValueError(f"job '{job}' does not pack trials")
    torch.set_num_threads(max(1, int(placement.cpus)))
    return train_pack(configs, reporter)


def run_distributed(job: str, config: dict, placement: Placement, train_run: TrainRun) -> dict:
    # Ray Train is heavy to import, and only multi-worker trials run under it
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def worker_loop(loop_config: dict) -> None:
        import ray.train  # (imported on the worker, where this loop runs)

        torch.set_num_threads(max(1, int(loop_config["cpus"])))
        rank = ray.train.get_context().get_world_rank()
        uri, run_id = loop_config["tracking"]
        reporter = tracking.TrialReporter(
            tracking.client_for(uri),
            run_id,
            rank=rank,
            report=ray.train.report,
            extra={"mlflow_run_id": run_id},
        )
        JOBS[loop_config["job"]].train(loop_config["config"], reporter)

    resources = {"CPU": placement.cpus} | ({"GPU": placement.gpus} if placement.gpus else {}) | placement.accelerator
    loop_config = {
        "job": job,
        "config": config,
        "cpus": placement.cpus,
        "tracking": (train_run.tracking_uri, train_run.run_id),
    }
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=placement.workers, use_gpu=placement.gpus > 0, resources_per_worker=resources
        ),
        # Train V2 keeps every checkpoint unless told (CheckpointConfig.num_to_keep defaults to None).
        run_config=RunConfig(
            name=train_run.name,
            storage_path=train_run.storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        ),
    )
    result = trainer.fit()
    return dict(result.metrics or {})
