"""Where a trial's job actually runs.

One worker (the default): the job's train function runs in the Tune trial process itself. A TorchTrainer per
trial costs tens of seconds of start-up on a small machine (../shared/reference/stack.md measured 107 s vs 23.5 s
for four trivial trials), so it is only worth it when a trial spans several workers or GPUs; that path is the
seam below (spec validation refuses `workers > 1` until it exists)."""

from __future__ import annotations

from typing import Any

import torch

from teachsweep.jobs import JOBS
from teachsweep.reporter import Reporter


def run_job(job: str, config: dict[str, Any], reporter: Reporter, cpus: float = 1, workers: int = 1) -> dict:
    if workers > 1:
        raise NotImplementedError("multi-worker trials (ray.train.torch.TorchTrainer) are not implemented yet")
    torch.set_num_threads(max(1, int(cpus)))
    return JOBS[job].train(config, reporter)
