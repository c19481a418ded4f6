"""`teachsweep bench distributed`: the same job in-process and under 1- and 2-worker TorchTrainers: time per step
and fixed start-up cost."""

from __future__ import annotations

import tempfile
import time

import ray
from ray import tune
from rich.console import Console
from rich.table import Table

from teachsweep import launch, tracking
from teachsweep.benchmarks.measure import ProcessTreePeak, peak_memory
from teachsweep.benchmarks.overhead import OVERHEAD_JOB
from teachsweep.layout import LOCAL_STORE
from teachsweep.reporter import Reporter
from teachsweep.sweep import init_ray, quiet_libraries


def distributed_cost(steps: int, repeats: int, console: Console) -> None:
    """The same small LoT job in-process, under a 1-worker TorchTrainer and under a 2-worker gloo TorchTrainer,
    each inside a Tune trial: time per teacher step as the job measures it, and the fixed cost (wall time minus
    the steps), which holds the TorchTrainer start-up. Interleaved repeats, the fastest of each arm shown."""
    quiet_libraries()
    job = OVERHEAD_JOB | {"epochs": 1, "max_eval_examples": 64, "steps_per_epoch": steps}
    arms = [("in-process", 1), ("TorchTrainer", 1), ("TorchTrainer", 2)]
    cases = [arm for _ in range(repeats) for arm in arms]
    init_ray(total_cpus=4)  # two 1-CPU workers plus the trial's token CPU on a 2-core machine
    with ProcessTreePeak() as tree, tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/{LOCAL_STORE}"
        experiment_id = tracking.ensure_experiment(tracking.client_for(uri), "bench-distributed")

        def trainable(config: dict) -> None:
            arm, workers = cases[config["case"]]
            run_id = tracking.client_for(uri).create_run(experiment_id).info.run_id
            start = time.perf_counter()
            if arm == "in-process":
                metrics = launch.run_job("lot", job, Reporter(), launch.Placement(cpus=1))
            else:
                train_run = launch.TrainRun(uri, run_id, f"{tmp}/train", f"bench-{config['case']}")
                metrics = launch.run_distributed("lot", job, launch.Placement(cpus=1, workers=workers), train_run)
            tune.report({"wall_s": time.perf_counter() - start, "step_s": metrics["time/teacher_step_s"]})

        grid = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 0.01}),
            param_space={"case": tune.grid_search(list(range(len(cases))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(name="bench-distributed", storage_path=tmp, verbose=0),
        ).fit()
        measured: dict[tuple[str, int], list[tuple[float, float]]] = {arm: [] for arm in arms}
        for result in grid:
            measured[cases[result.config["case"]]].append((result.metrics["wall_s"], result.metrics["step_s"]))
        ray.shutdown()

    table = Table(
        title=f"bench distributed: LoT cnn:16 on digits, global batch 64, {steps} teacher steps, best of {repeats}"
    )
    for column in ("arm", "workers", "wall s", "s / teacher step", "fixed s (wall - steps)"):
        table.add_column(column)
    for arm, workers in arms:
        wall, step = min(measured[(arm, workers)])
        table.add_row(arm, str(workers), f"{wall:.1f}", f"{step:.4f}", f"{wall - steps * step:.1f}")
    console.print(table)
    console.print(peak_memory(tree))
