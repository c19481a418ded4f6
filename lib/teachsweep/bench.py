"""Benchmarks: each prints a table of what it measured in one run, with the command's parameters."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

OVERHEAD_JOB = {
    "task": "digits", "teacher": "cnn:16", "alpha": 0.5, "student_steps": 2, "batch_size": 64, "epochs": 2,
    "max_eval_examples": 200, "optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0,
}  # fmt: skip


def overhead(trials: int, steps: int, console: Console) -> None:
    """(a) the job as a plain call, (b) k trials of a bare Tune function trainable running it, (c) a k-trial
    teachsweep sweep (Optuna + MLflow + reporter) running it; one trial at a time so walls add up."""
    import ray
    from ray import tune

    from teachsweep.jobs import lot
    from teachsweep.spec import parse_spec
    from teachsweep.sweep import init_ray, quiet_libraries, run_sweep

    quiet_libraries()
    job = OVERHEAD_JOB | {"steps_per_epoch": max(1, steps // 2)}
    lot.train(job)  # warm caches (data, kernels) so that (a) is not charged for first-use costs
    plain = []
    for _ in range(2):
        start = time.perf_counter()
        lot.train(job)
        plain.append(time.perf_counter() - start)
    job_s = statistics.fmean(plain)

    init_ray()
    with tempfile.TemporaryDirectory() as tmp:

        def bare_trainable(config):
            start = time.perf_counter()
            lot.train(job | {"alpha": config["alpha"]})
            tune.report({"job_s": time.perf_counter() - start})

        start = time.perf_counter()
        grid = tune.Tuner(
            bare_trainable,
            param_space={"alpha": tune.grid_search([0.5] * trials)},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(name="bare", storage_path=tmp, verbose=0),
        ).fit()
        bare_wall = time.perf_counter() - start
        bare_inside = sum(r.metrics["job_s"] for r in grid)

        spec_text = f"""
name: bench-overhead
job: lot
config: {job!r}
space: {{alpha: {{type: uniform, low: 0.4999, high: 0.5001}}}}
num_samples: {trials}
max_concurrent_trials: 1
results_dir: {Path(tmp) / "results"}
"""
        start = time.perf_counter()
        outcome = run_sweep(parse_spec(spec_text.replace("'", '"')), spec_text)
        sweep_wall = time.perf_counter() - start
        from mlflow.tracking import MlflowClient

        client = MlflowClient(outcome.tracking_uri)
        runs = client.search_runs(
            [client.get_experiment_by_name("bench-overhead").experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'",
        )
        sweep_inside = sum(run.data.metrics["time/job_s"] for run in runs)
    ray.shutdown()

    bare_overhead = (bare_wall - bare_inside) / trials
    sweep_overhead = (sweep_wall - sweep_inside) / trials
    table = Table(title=f"bench overhead: {trials} trials, {steps} teacher steps each, one at a time")
    for column in ("", "wall s", "inside job s", "overhead s/trial", "fraction in job"):
        table.add_column(column)
    table.add_row("(a) plain call", f"{job_s:.2f}", f"{job_s:.2f}", "0", "1.00")
    table.add_row("(b) bare Tune trainable", f"{bare_wall:.1f}", f"{bare_inside:.1f}", f"{bare_overhead:.2f}",
                  f"{bare_inside / bare_wall:.2f}")  # fmt: skip
    table.add_row("(c) teachsweep sweep", f"{sweep_wall:.1f}", f"{sweep_inside:.1f}", f"{sweep_overhead:.2f}",
                  f"{sweep_inside / sweep_wall:.2f}")  # fmt: skip
    console.print(table)
    console.print(f"per-trial overhead, teachsweep / bare Tune: {sweep_overhead / bare_overhead:.2f}x (target <= 1.1x)")
    for seconds in (60.0,):
        console.print(f"fraction of wall time inside the job for {seconds:.0f} s trials at this overhead: "
                      f"{seconds / (seconds + sweep_overhead):.3f} (target >= 0.85)")  # fmt: skip


LOT_BENCH_JOB = {
    "task": "mnist_5k", "teacher": "resnet:8", "batch_size": 64, "epochs": 1, "max_eval_examples": 64,
    "optimizer": "sgd", "lr": 0.05, "alpha": 0.5, "temperature": 1.5,
}  # fmt: skip


def lot_cost(steps: int, repeats: int, model: str, console: Console) -> None:
    """Time per teacher step of LoT over the teacher-only step, for N in {1, 2, 4}, equal-sized models, next
    to the FLOP ideal (6 + 4(N-1)) / 3 (forward = 1 unit, backward = 2)."""
    from teachsweep.jobs import lot

    job = LOT_BENCH_JOB | {"teacher": model, "steps_per_epoch": steps}
    lot.train(job | {"steps_per_epoch": 3})  # warm-up: data, kernels
    arms = [("teacher_only", 1), ("lot", 1), ("lot", 2), ("lot", 4)]
    timings: dict[tuple[str, int], list[float]] = {arm: [] for arm in arms}
    for _ in range(repeats):  # interleaved, so that drift in machine speed hits every arm alike
        for arm, n in arms:
            metrics = lot.train(job | {"arm": arm, "student_steps": n})
            timings[(arm, n)].append(metrics["time/teacher_step_s"])
    base = statistics.median(timings[("teacher_only", 1)])
    table = Table(title=f"bench lot: {model} on mnist_5k, batch 64, {steps} teacher steps x {repeats} repeats")
    for column in ("arm", "N", "s / teacher step", "ratio to teacher-only", "FLOP ideal", "ratio / ideal"):
        table.add_column(column)
    for arm, n in arms:
        step = statistics.median(timings[(arm, n)])
        ideal = 1.0 if arm == "teacher_only" else (6 + 4 * (n - 1)) / 3
        table.add_row(arm, str(n), f"{step:.4f}", f"{step / base:.2f}", f"{ideal:.2f}", f"{step / base / ideal:.2f}")
    console.print(table)


def relevance_throughput(examples: int, batch_size: int, model_name: str, console: Console) -> None:
    """Explanations per second of the batched relevance explainers versus a loop over single examples (the
    reference code's way), same model, same inputs, one run."""
    import torch

    from teachsweep import data, models
    from teachsweep.explain import relevance

    task = data.load_task("rotten_tomatoes")
    model = models.build_model(model_name, task, seed=0).eval()
    batches = data.make_batches(task, "test", models.load_tokenizer(model_name), 64, examples)
    inputs = list(data.eval_batches(batches, batch_size))
    table = Table(title=f"bench relevance: {model_name}, {examples} rotten_tomatoes test sentences, "
                        f"{torch.get_num_threads()} threads")  # fmt: skip
    for column in ("explainer", f"batched ({batch_size}) expl/s", "single-example loop expl/s", "speed-up"):
        table.add_column(column)
    for name in ("relevance", "rollout", "attention_gradcam"):
        explainer = relevance.EXPLAINERS[name]
        explainer(model, inputs[0])  # warm-up
        start = time.perf_counter()
        for batch in inputs:
            explainer(model, batch)
        batched = examples / (time.perf_counter() - start)
        start = time.perf_counter()
        for batch in inputs:
            relevance.single_example_loop(explainer, model, batch)
        single = examples / (time.perf_counter() - start)
        table.add_row(name, f"{batched:.1f}", f"{single:.1f}", f"{batched / single:.1f}x")
    console.print(table)
