"""Where a trial's job actually runs.

One worker (the default): the job's train function runs in the Tune trial process itself. A TorchTrainer per
trial costs tens of seconds of start-up on a small machine (docs/benchmarks.md, `bench distributed`: 107 s vs 23.5 s
for four trivial trials), so it is only worth it when a trial spans several workers or GPUs.

Several workers: the trial starts a `ray.train.torch.TorchTrainer` (Train V2) whose workers run the same train
function under DDP (gloo on CPU, NCCL on GPU); every worker reports with `ray.train.report`, rank 0 logs to
MLflow, and `TuneReportCallback` forwards rank 0's metrics to the Tune trial (and so to Optuna and ASHA)."""

from __future__ import annotations

from typing import Any

import torch

from teachsweep.jobs import JOBS
from teachsweep.reporter import Reporter

CHECKPOINTS_KEPT = 2  # the newest and the one before it, in case the newest was half-written


def run_job(
    job: str,
    config: dict[str, Any],
    reporter: Reporter,
    cpus: float = 1,
    workers: int = 1,
    gpus: float = 0,
    tracking: tuple[str, str] | None = None,
    storage: str | None = None,
    name: str = "trial",
    accelerator: dict[str, float] | None = None,
) -> dict:
    if workers > 1:
        if tracking is None:
            raise ValueError("multi-worker trials need a tracking (uri, run id) to log from rank 0")
        return run_distributed(job, config, workers, cpus, gpus, tracking, storage, name, accelerator)
    torch.set_num_threads(max(1, int(cpus)))
    return JOBS[job].train(config, reporter)


def run_distributed(
    job: str,
    config: dict,
    workers: int,
    cpus: float,
    gpus: float,
    tracking,
    storage,
    name,
    accelerator: dict[str, float] | None = None,
):
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    def worker_loop(loop_config: dict) -> None:
        import ray.train

        from teachsweep import tracking as tracking_module

        torch.set_num_threads(max(1, int(loop_config["cpus"])))
        rank = ray.train.get_context().get_world_rank()
        uri, run_id = loop_config["tracking"]
        reporter = tracking_module.TrialReporter(
            tracking_module.client_for(uri),
            run_id,
            rank=rank,
            report=ray.train.report,
            extra={"mlflow_run_id": run_id},
        )
        JOBS[loop_config["job"]].train(loop_config["config"], reporter)

    resources = {"CPU": cpus} | ({"GPU": gpus} if gpus else {}) | (accelerator or {})
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"job": job, "config": config, "cpus": cpus, "tracking": tracking},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        # Train V2 keeps every checkpoint unless told (CheckpointConfig.num_to_keep defaults to None).
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        ),
    )
    result = trainer.fit()
    return dict(result.metrics or {})
