"""`teachsweep bench overhead`: a sweep's per-trial and per-sweep overhead against a bare Ray Tune trainable
running the same job."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
from ray import tune
from rich.console import Console
from rich.table import Table

from teachsweep.benchmarks.measure import ProcessTreePeak, bench_sweep, peak_memory
from teachsweep.jobs import lot
from teachsweep.sweep import init_ray, quiet_libraries

OVERHEAD_JOB = {
    "task": "digits",
    "teacher": "cnn:16",
    "alpha": 0.5,
    "student_steps": 2,
    "batch_size": 64,
    "epochs": 2,
    "max_eval_examples": 200,
    "optimizer": "sgd",
    "lr": 0.05,
    "weight_decay": 0.0,
}


def overhead(trials: int, steps: int, console: Console) -> None:
    """Wall time outside the job for (b) a bare Tune function trainable running the job (Tune's defaults, and
    with reuse_actors) and (c) a teachsweep sweep (Optuna RDB + MLflow + reporter + checkpoints), each at k and
    3k trials run one at a time: the difference gives the marginal overhead per trial, the rest is the fixed
    cost per sweep (for teachsweep: creating the MLflow store, the study, the parent run, the final tables)."""
    quiet_libraries()
    job = OVERHEAD_JOB | {"steps_per_epoch": max(1, steps // 2)}
    lot.train(job)  # warm caches (data, kernels) so that (a) is not charged for first-use costs
    start = time.perf_counter()
    lot.train(job)
    job_s = time.perf_counter() - start

    def bare_tune(count: int, reuse: bool, storage: str) -> tuple[float, float]:
        def bare_trainable(config: dict) -> None:
            begin = time.perf_counter()
            lot.train(job | {"alpha": config["alpha"]})
            tune.report({"job_s": time.perf_counter() - begin})

        begin = time.perf_counter()
        grid = tune.Tuner(
            bare_trainable,
            param_space={"alpha": tune.grid_search([0.5] * count)},
            tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse),
            run_config=tune.RunConfig(name=f"bare-{reuse}-{count}", storage_path=storage, verbose=0),
        ).fit()
        return time.perf_counter() - begin, sum(r.metrics["job_s"] for r in grid)

    def teachsweep_sweep(count: int, storage: str) -> tuple[float, float]:
        name = f"bench-overhead-{count}"
        spec = {
            "name": name,
            "job": "lot",
            "config": job,
            "space": {"alpha": {"type": "uniform", "low": 0.4999, "high": 0.5001}},
            "num_samples": count,
            "max_concurrent_trials": 1,
            "results_dir": str(Path(storage) / name),
        }
        wall, runs = bench_sweep(spec)
        return wall, sum(run.data.metrics["time/job_s"] for run in runs)

    init_ray()
    arms: dict[str, Callable[[int, str], tuple[float, float]]] = {
        "(b) bare Tune trainable, Tune defaults": lambda n, tmp: bare_tune(n, False, tmp),
        "(b') bare Tune trainable, reuse_actors": lambda n, tmp: bare_tune(n, True, tmp),
        "(c) teachsweep sweep (reuse_actors)": teachsweep_sweep,
    }
    measured = {}
    with ProcessTreePeak() as tree, tempfile.TemporaryDirectory() as tmp:
        for name, run in arms.items():
            measured[name] = [run(n, tmp) for n in (trials, 3 * trials)]
        ray.shutdown()

    table = Table(
        title=f"bench overhead: {trials} and {3 * trials} trials of {steps} teacher steps, one at a time "
        f"(the job alone: {job_s:.2f} s)"
    )
    for column in (
        "",
        f"wall s ({trials} / {3 * trials})",
        "inside jobs s",
        "overhead s / trial (marginal)",
        "fixed s / sweep",
    ):
        table.add_column(column)
    per_trial = {}
    for name, ((wall_k, in_k), (wall_3k, in_3k)) in measured.items():
        per_trial[name] = ((wall_3k - in_3k) - (wall_k - in_k)) / (2 * trials)
        fixed = (wall_k - in_k) - trials * per_trial[name]
        table.add_row(
            name, f"{wall_k:.1f} / {wall_3k:.1f}", f"{in_k:.1f} / {in_3k:.1f}", f"{per_trial[name]:.2f}", f"{fixed:.1f}"
        )
    console.print(table)
    ours = per_trial["(c) teachsweep sweep (reuse_actors)"]
    for name in list(arms)[:2]:
        console.print(
            f"marginal per-trial overhead, teachsweep / {name[4:]}: {ours / per_trial[name]:.2f}x (target <= 1.1x)"
        )
    console.print(
        f"fraction of wall time inside the job for 60 s trials at this overhead: {60 / (60 + ours):.3f}"
        " (target >= 0.85)"
    )
    console.print(peak_memory(tree))
